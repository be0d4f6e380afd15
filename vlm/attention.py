"""The one fused attention entry point. Every attention vlm owns calls :func:`attention`.

Inputs are laid out ``(B, heads, L, head_dim)``. The work goes to
``torch.nn.functional.scaled_dot_product_attention``, which picks the flash, cuDNN,
memory-efficient or math kernel for the device; softmax(QK^T) is never written by hand.
Structured masks (Flamingo's media mask) go to FlexAttention as block masks on GPUs, where a
dense boolean mask would rule out the fused kernels; on CPU, where FlexAttention runs unfused,
the dense mask is faster and is kept. (Packed rows inside the LM: see ``vlm.packing``.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

#: Use FlexAttention block masks on CPU too (tests set it; on CPU it is slower than dense masks).
FLEX_ON_CPU = False


def use_block_masks(device: torch.device) -> bool:
    """Whether structured masks should be FlexAttention block masks on ``device``."""
    return device.type == "cuda" or FLEX_ON_CPU


def block_mask(mask_mod: Callable, batch: int, q_len: int, kv_len: int, device: torch.device):
    """A FlexAttention block mask from ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (same for every head)."""
    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device)


@functools.cache
def _flex_attention(device_type: str) -> Callable:
    # Compiled, FlexAttention is one fused kernel; eager it is a reference implementation.
    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    block_mask=None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Scaled dot-product attention over ``(B, H, L, Dh)`` tensors.

    Args:
        mask: boolean, True where a query may attend to a key; broadcast to ``(B, H, Lq, Lk)``.
            Prefer ``is_causal`` or no mask: a dense mask rules out the flash kernel.
        block_mask: a FlexAttention ``BlockMask`` (see :func:`block_mask`) instead of ``mask``.
        is_causal: causal masking without materialising a mask.
        dropout_p: attention dropout (pass 0 in eval).
        scale: logit scale; defaults to ``1 / sqrt(head_dim)``.
    """
    if block_mask is not None:
        if mask is not None or is_causal or dropout_p:
            raise ValueError("a block mask replaces mask / is_causal, and takes no attention dropout")
        return _flex_attention(q.device.type)(q, k, v, block_mask=block_mask, scale=scale)
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention through :func:`attention`.

    Args:
        dim: width of the queries (and of the output).
        num_heads: number of heads.
        head_dim: width of one head; defaults to ``dim // num_heads``.
        kv_dim: width of the keys/values source for cross-attention; ``None`` means
            self-attention, which uses one fused ``qkv`` projection.
        bias: bias on the q, k, v projections.
        out_bias: bias on the output projection.
        dropout: attention dropout in training.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        kv_dim: int | None = None,
        bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
            head_dim = dim // num_heads
        self.num_heads, self.head_dim, self.dropout = num_heads, head_dim, dropout
        inner = num_heads * head_dim
        self.is_cross = kv_dim is not None
        if self.is_cross:
            self.q = nn.Linear(dim, inner, bias=bias)
            self.kv = nn.Linear(kv_dim, 2 * inner, bias=bias)
        else:
            self.qkv = nn.Linear(dim, 3 * inner, bias=bias)
        self.out = nn.Linear(inner, dim, bias=out_bias)

    def _heads(self, x: Tensor) -> Tensor:  # (B, L, H*Dh) -> (B, H, L, Dh)
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``(B, H, S, Dh)`` of a cross-attention context, to compute once and reuse."""
        k, v = self.kv(context).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        kv: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        block_mask=None,
        is_causal: bool = False,
    ) -> Tensor:
        """x: (B, L, dim); context: (B, S, kv_dim) for cross-attention, or its ``kv`` already
        projected (:meth:`project_kv`); returns (B, L, dim)."""
        if self.is_cross:
            if kv is None:
                if context is None:
                    raise ValueError("cross-attention needs a context tensor")
                kv = self.project_kv(context)
            q, (k, v) = self._heads(self.q(x)), kv
        else:
            q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        y = attention(
            q,
            k,
            v,
            mask=mask,
            block_mask=block_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).flatten(2))
