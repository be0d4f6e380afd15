"""A second cross-attention bridge, defined only in the tests to hold the bridge contract to
its word: one gated cross-attention layer over the encoder's raw features, written against
``CrossAttentionBridge`` and registered like any other part. The model and generation code
must run it without knowing it exists."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlm.attention import MultiHeadAttention
from vlm.bridges.base import CrossAttentionBridge, Media
from vlm.registry import register_bridge


@dataclass
class GatedXAttnConfig:
    name: str = "test_xattn"
    num_heads: int = 2
    layer: int = -1  # the LM layer it runs before (-1: the last)


class GatedXAttn(nn.Module):
    """``h + tanh(gate) * attn(norm(h), features of the latest image)``; the gate starts at 0."""

    def __init__(self, dim: int, feature_dim: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, kv_dim=feature_dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, h: Tensor, media: Media | None) -> Tensor:
        if media is None:
            return h
        dtype, h = h.dtype, h.to(self.gate.dtype)
        _, n_img, M, _ = media.latents.shape
        index = media.index if media.index.shape[1] == h.shape[1] else media.index[:, -1:]
        latest = (index - 1).clamp(min=0)  # no image yet: attend to image 0, zeroed below
        key_image = torch.arange(n_img * M, device=h.device) // M
        mask = (key_image[None, None] == latest[..., None]).unsqueeze(1)  # (B, 1, T, n_img*M)
        x = self.attn(self.norm(h), media.latents.flatten(1, 2).to(h.dtype), mask=mask)
        x = torch.where((index > 0).unsqueeze(-1), x, torch.zeros_like(x))
        return (h + torch.tanh(self.gate) * x).to(dtype)


@register_bridge("test_xattn", GatedXAttnConfig)
class GatedXAttnBridge(CrossAttentionBridge):
    def __init__(self, config: GatedXAttnConfig, *, vision_dim: int, text_dim: int, text_layers: int):
        super().__init__()
        layer = config.layer % text_layers
        self.blocks = nn.ModuleDict({str(layer): GatedXAttn(text_dim, vision_dim, config.num_heads)})

    def forward(self, features: Tensor) -> Tensor:  # the raw features are the "latents"
        return features
