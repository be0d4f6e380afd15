"""Flamingo's bridge: a Perceiver resampler plus tanh-gated cross-attention inside the LM.

The resampler turns each image's features into ``num_latents`` latents. Gated blocks run
before every ``cross_attention_interval``-th LM layer (forward pre-hooks on the HF layers);
their gates start at 0, so a fresh model computes exactly what the bare LM computes. Each
text token attends only to the latents of the most recent image at or before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlm.attention import MultiHeadAttention, block_mask, use_block_masks
from vlm.bridges.base import CrossAttentionBridge, Media
from vlm.registry import register_bridge
from vlm.schema import ConfigError

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


@dataclass
class PerceiverConfig:
    """Resampler and gated cross-attention sizes (open_flamingo's by default).

    Args:
        num_latents: latents per image.
        depth, num_heads, head_dim, mlp_ratio: resampler sizes.
        mlp_act: resampler MLP activation, ``"gelu"`` (open_flamingo) or ``"relu"`` (IDEFICS).
        cross_attention_interval: a gated block before every k-th LM layer.
        placement: ``"first"`` puts it before layer ``i`` when ``i % k == 0`` (IDEFICS);
            ``"last"`` when ``(i + 1) % k == 0`` (open_flamingo).
        xattn_heads, xattn_head_dim, xattn_mlp_ratio: gated cross-attention sizes.
        xattn_norm: the gated blocks' norms, ``"layernorm"`` (open_flamingo) or ``"rmsnorm"``
            (IDEFICS, with ``xattn_norm_eps``).
        xattn_mlp: the gated blocks' MLP, ``"gelu"`` (open_flamingo) or ``"swiglu"`` (IDEFICS).
    """

    name: str = "perceiver"
    num_latents: int = 64
    depth: int = 6
    num_heads: int = 8
    head_dim: int = 64
    mlp_ratio: float = 4.0
    mlp_act: str = "gelu"
    cross_attention_interval: int = 1
    placement: str = "first"
    xattn_heads: int = 8
    xattn_head_dim: int = 64
    xattn_mlp_ratio: float = 4.0
    xattn_norm: str = "layernorm"
    xattn_norm_eps: float = 1e-5
    xattn_mlp: str = "gelu"


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, the Llama MLP (IDEFICS's gated blocks)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _norm(dim: int, config: PerceiverConfig) -> nn.Module:
    if config.xattn_norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.xattn_norm_eps)
    return nn.LayerNorm(dim, eps=config.xattn_norm_eps)


def _mlp(dim: int, ratio: float, act: str) -> nn.Sequential:
    hidden = round(dim * ratio)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, hidden, bias=False),
        _ACTIVATIONS[act](),
        nn.Linear(hidden, dim, bias=False),
    )


class ResamplerLayer(nn.Module):
    def __init__(self, dim: int, config: PerceiverConfig):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(
            dim, config.num_heads, head_dim=config.head_dim, kv_dim=dim, bias=False, out_bias=False
        )
        self.mlp = _mlp(dim, config.mlp_ratio, config.mlp_act)

    def forward(self, latents: Tensor, media: Tensor) -> Tensor:  # (N, M, D), (N, T, D)
        q = self.norm_latents(latents)
        latents = latents + self.attn(q, torch.cat([self.norm_media(media), q], dim=1))
        return latents + self.mlp(latents)


class PerceiverResampler(nn.Module):
    """Image features ``(N, T, D)`` to a fixed number of latents ``(N, num_latents, D)``."""

    def __init__(self, dim: int, config: PerceiverConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(config.num_latents, dim))
        self.layers = nn.ModuleList(ResamplerLayer(dim, config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: Tensor) -> Tensor:
        latents = self.latents.to(media.dtype).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, media)
        return self.norm(latents)


class GatedCrossAttentionBlock(nn.Module):
    """``h + tanh(a) * xattn(h, media)``, then ``h + tanh(b) * mlp(h)``; ``a = b = 0`` at init."""

    def __init__(self, dim: int, media_dim: int, config: PerceiverConfig):
        super().__init__()
        self.attn_norm = _norm(dim, config)
        self.attn = MultiHeadAttention(
            dim,
            config.xattn_heads,
            head_dim=config.xattn_head_dim,
            kv_dim=media_dim,
            bias=False,
            out_bias=False,
        )
        self.attn_gate = nn.Parameter(torch.zeros(1))
        if config.xattn_mlp == "swiglu":
            self.mlp = nn.Sequential(_norm(dim, config), SwiGLU(dim, round(dim * config.xattn_mlp_ratio)))
        else:  # open_flamingo's: norm, Linear, GELU, Linear (its norm follows xattn_norm too)
            self.mlp = _mlp(dim, config.xattn_mlp_ratio, "gelu")
            self.mlp[0] = _norm(dim, config)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, h: Tensor, media: Media | None) -> Tensor:
        """h (B, T, D); ``media`` the images the rows attend to (``None``: no images).

        Without media (a text-only batch) only the gated MLP runs, exactly as it does for
        the text tokens of a batch with images, so a row never depends on its neighbours.
        """
        dtype = h.dtype  # the block computes in its own precision (the LM may be bf16)
        h = h.to(self.mlp_gate.dtype)
        if media is not None:
            h = h + torch.tanh(self.attn_gate) * self._attend(h, media)
        return (h + torch.tanh(self.mlp_gate) * self.mlp(h)).to(dtype)

    def _attend(self, h: Tensor, media: Media) -> Tensor:
        B, n_img, M, _ = media.latents.shape
        same = media.index.shape[1] == h.shape[1]
        index = media.index if same else media.index[:, -1:]
        first = index if media.first is None else media.first if same else media.first[:, -1:]
        kv = media.cache.get(("kv", id(self)))
        if kv is None:
            kv = self.attn.project_kv(media.latents.flatten(1, 2).to(h.dtype))
            if not torch.is_grad_enabled():  # inference: project the latents once per generation
                media.cache["kv", id(self)] = kv
        mask = block = None
        if n_img > 1:  # only the latest image (its tiles) is visible; one entry needs no mask
            # Rows with no image yet see entry 0, zeroed below.
            latest, lowest = (index - 1).clamp(min=0), (first - 1).clamp(min=0)
            T = latest.shape[1]
            if T == 1 and media.first is None:  # a new token: its image's keys only, whatever n_img
                rows = torch.arange(B, device=h.device)
                kv = tuple(t.unflatten(2, (n_img, M))[rows, :, latest[:, 0]] for t in kv)
            elif use_block_masks(h.device) and T > 1:
                block = media.cache.get(("block_mask", T))
                if block is None:  # built once per forward, shared by every gated block
                    block = block_mask(
                        lambda b, _, q, k: (lowest[b, q] <= k // M) & (k // M <= latest[b, q]),
                        B,
                        T,
                        n_img * M,
                        h.device,
                    )
                    media.cache["block_mask", T] = block
            else:
                key_image = torch.arange(n_img * M, device=h.device) // M  # (n_img*M,)
                seen = (key_image[None, None, :] >= lowest[:, :, None]) & (
                    key_image[None, None, :] <= latest[:, :, None]
                )
                mask = seen.unsqueeze(1)  # (B, 1, T, n_img*M)
        x = self.attn(self.attn_norm(h), kv=kv, mask=mask, block_mask=block)
        return torch.where((index > 0).unsqueeze(-1), x, torch.zeros_like(x))


@register_bridge("perceiver", PerceiverConfig)
class PerceiverBridge(CrossAttentionBridge):
    def __init__(self, config: PerceiverConfig, *, vision_dim: int, text_dim: int, text_layers: int):
        super().__init__()
        k = config.cross_attention_interval
        if k < 1 or config.placement not in ("first", "last"):
            raise ConfigError(
                "bridge.cross_attention_interval must be >= 1 and bridge.placement 'first' or 'last'"
            )
        if config.mlp_act not in _ACTIVATIONS:
            raise ConfigError(f"bridge.mlp_act must be one of {sorted(_ACTIVATIONS)}")
        if config.xattn_norm not in ("layernorm", "rmsnorm") or config.xattn_mlp not in ("gelu", "swiglu"):
            raise ConfigError(
                "bridge.xattn_norm must be 'layernorm' or 'rmsnorm', and bridge.xattn_mlp 'gelu' or 'swiglu'"
            )
        self.config = config
        self.resampler = PerceiverResampler(vision_dim, config)
        offset = 0 if config.placement == "first" else k - 1
        self.layer_ids = [i for i in range(text_layers) if i % k == offset]
        self.blocks = nn.ModuleDict(
            {str(i): GatedCrossAttentionBlock(text_dim, vision_dim, config) for i in self.layer_ids}
        )

    def forward(self, features: Tensor) -> Tensor:  # (N, T, Dv) -> (N, num_latents, Dv)
        return self.resampler(features)
