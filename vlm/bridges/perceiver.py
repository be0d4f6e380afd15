"""Flamingo's bridge: a Perceiver resampler plus tanh-gated cross-attention inside the LM.

The resampler turns each image's features into ``num_latents`` latents. Gated blocks run
before every ``cross_attention_interval``-th LM layer (forward pre-hooks on the HF layers);
their gates start at 0, so a fresh model computes exactly what the bare LM computes. Each
text token attends only to the latents of the most recent image at or before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vlm.attention import MultiHeadAttention, block_mask, use_block_masks
from vlm.bridges.base import Bridge
from vlm.config import ConfigError
from vlm.packing import run_starts
from vlm.registry import register_bridge

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
        index = media.index if media.index.shape[1] == h.shape[1] else media.index[:, -1:]
        kv = media.kv.get(id(self))
        if kv is None:
            kv = self.attn.project_kv(media.latents.flatten(1, 2).to(h.dtype))
            if not torch.is_grad_enabled():  # inference: project the latents once per generation
                media.kv[id(self)] = kv
        mask = block = None
        if n_img > 1:  # only the latest image is visible; one image needs no mask at all
            latest = (index - 1).clamp(min=0)  # rows with no image yet see image 0, zeroed below
            T = latest.shape[1]
            if T == 1:  # a new token: its latest image's keys only, so the cost ignores n_img
                rows = torch.arange(B, device=h.device)
                kv = tuple(t.unflatten(2, (n_img, M))[rows, :, latest[:, 0]] for t in kv)
            elif use_block_masks(h.device):
                block = media.block_masks.get(T)
                if block is None:  # built once per forward, shared by every gated block
                    block = block_mask(lambda b, _, q, k: latest[b, q] == k // M, B, T, n_img * M, h.device)
                    media.block_masks[T] = block
            else:
                key_image = torch.arange(n_img * M, device=h.device) // M  # (n_img*M,)
                mask = (key_image[None, None, :] == latest[:, :, None]).unsqueeze(1)  # (B, 1, T, n_img*M)
        x = self.attn(self.attn_norm(h), kv=kv, mask=mask, block_mask=block)
        return torch.where((index > 0).unsqueeze(-1), x, torch.zeros_like(x))


@dataclass
class Media:
    """The images a batch attends to.

    ``latents`` ``(B, n_img, M, D)``; ``index`` ``(B, T)``: the 1-based number of the latest image
    at or before each token (0: none yet). New tokens of a cached generation (fewer than ``T``)
    take the last column: the latest image. ``kv`` caches each block's projected keys and values.
    """

    latents: Tensor
    index: Tensor
    kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    block_masks: dict[int, Any] = field(default_factory=dict)


@register_bridge("perceiver", PerceiverConfig)
class PerceiverBridge(Bridge):
    cross_attention = True

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
        self._media: Media | None = None

    def tokens_per_image(self, num_features: int) -> int:
        return 1  # the <image> token marks where an image sits in the text

    def forward(self, features: Tensor) -> Tensor:  # (N, T, Dv) -> (N, num_latents, Dv)
        return self.resampler(features)

    def attach(self, layers: nn.ModuleList) -> None:
        """Runs the gated blocks before their LM layers (called once, by the model)."""
        for i in self.layer_ids:
            layers[i].register_forward_pre_hook(self._make_hook(self.blocks[str(i)]), with_kwargs=True)

    def _make_hook(self, block: GatedCrossAttentionBlock):
        def before_layer(module, args, kwargs):
            if args:
                return (block(args[0], self._media), *args[1:]), kwargs
            kwargs["hidden_states"] = block(kwargs["hidden_states"], self._media)
            return args, kwargs

        return before_layer

    def set_media(
        self, latents: Tensor | None, image_positions: Tensor | None = None, sample_ids: Tensor | None = None
    ) -> None:
        """What the LM attends to from now on (``None``: no images).

        Args:
            latents: ``(N_img, M, D)``, the images of the batch in reading order.
            image_positions: ``(B, T)`` bool, True at each ``<image>`` token.
            sample_ids: ``(B, T)`` for rows packing several samples: a token sees no image of
                an earlier sample.
        """
        if latents is None:
            self._media = None
            return
        counts = image_positions.sum(1)
        n_max = max(int(counts.max()), 1)
        media = latents.new_zeros(image_positions.shape[0], n_max, *latents.shape[1:])
        media[torch.arange(n_max, device=counts.device)[None] < counts[:, None]] = latents
        index = image_positions.long().cumsum(1)
        if sample_ids is not None:  # images counted before the token's sample began are not its own
            earlier = (index - image_positions.long()).gather(1, run_starts(sample_ids))
            index = torch.where(index > earlier, index, 0)
        self._media = Media(media, index)

    def set_media_from_mask(self, latents: Tensor, image_attention_mask: Tensor) -> None:
        """What the LM attends to, given as IDEFICS does.

        Args:
            latents: ``(B, n_img, M, D)``, each row's images (rows may carry padding images).
            image_attention_mask: ``(B, T, n_img)``, 1 where a token may attend to an image. Each
                token may see at most one image (the most recent one, as vlm's processor builds it).
        """
        if image_attention_mask.shape[-1] != latents.shape[1]:
            raise ValueError(
                f"image_attention_mask has {image_attention_mask.shape[-1]} image columns but "
                f"{latents.shape[1]} images per row were given"
            )
        seen = image_attention_mask.bool()
        if (seen.sum(-1) > 1).any():
            raise ValueError(
                "image_attention_mask lets a token attend to several images; vlm attends to the most "
                "recent image only (build the mask with only the latest image per token)"
            )
        index = torch.where(seen.any(-1), seen.long().argmax(-1) + 1, 0)
        self._media = Media(latents, index)

    def repeat_media(self, times: int) -> None:
        """Each row's media repeated ``times`` (beam search expands rows that way)."""
        if self._media is not None:
            m = self._media
            self._media = Media(m.latents.repeat_interleave(times, 0), m.index.repeat_interleave(times, 0))
