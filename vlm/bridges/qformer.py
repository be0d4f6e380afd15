"""BLIP-2's Q-Former: learned queries that cross-attend to image features.

BERT-style post-norm layers over the queries only (the LM-facing path of BLIP-2):
self-attention in every layer, cross-attention to the image in every
``cross_attention_frequency``-th layer (``layer_idx % frequency == 0``), then a
feed-forward; a final Linear projects the queries into the LM's embedding space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlm.attention import MultiHeadAttention
from vlm.bridges.base import PrefixBridge
from vlm.registry import register_bridge
from vlm.schema import ConfigError


@dataclass
class QFormerConfig:
    """Sizes follow BLIP-2 (a BERT-base Q-Former with 32 queries).

    Args:
        num_queries: visual tokens per image, whatever the image size.
        cross_attention_frequency: a layer cross-attends when ``layer_idx % frequency == 0``.
    """

    name: str = "qformer"
    num_queries: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, vision_dim: int, cross: bool):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = MultiHeadAttention(h, config.num_heads, dropout=config.dropout)
        self.self_norm = nn.LayerNorm(h, eps=eps)
        self.cross_attn = (
            MultiHeadAttention(h, config.num_heads, kv_dim=vision_dim, dropout=config.dropout)
            if cross
            else None
        )
        self.cross_norm = nn.LayerNorm(h, eps=eps) if cross else None
        self.ffn = nn.Sequential(
            nn.Linear(h, config.intermediate_size), nn.GELU(), nn.Linear(config.intermediate_size, h)
        )
        self.ffn_norm = nn.LayerNorm(h, eps=eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, q: Tensor, image: Tensor) -> Tensor:  # q (N, Q, H), image (N, T, Dv)
        q = self.self_norm(q + self.drop(self.self_attn(q)))
        if self.cross_attn is not None:
            q = self.cross_norm(q + self.drop(self.cross_attn(q, image)))
        return self.ffn_norm(q + self.drop(self.ffn(q)))


@register_bridge("qformer", QFormerConfig)
class QFormer(PrefixBridge):
    def __init__(self, config: QFormerConfig, *, vision_dim: int, text_dim: int, text_layers: int):
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ConfigError(
                f"bridge.hidden_size={config.hidden_size} is not divisible by bridge.num_heads="
                f"{config.num_heads}; pick a head count that divides the hidden size"
            )
        if config.cross_attention_frequency < 1:
            raise ConfigError("bridge.cross_attention_frequency must be >= 1")
        self.config = config
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_queries, config.hidden_size) * 0.02)
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(config, vision_dim, cross=i % config.cross_attention_frequency == 0)
            for i in range(config.num_layers)
        )
        self.language_projection = nn.Linear(config.hidden_size, text_dim)

    def tokens_per_image(self, num_features: int) -> int:
        return self.config.num_queries

    def forward(self, features: Tensor) -> Tensor:  # (N, T, Dv) -> (N, Q, D_lm)
        q = self.embed_drop(self.embed_norm(self.query_tokens.expand(features.shape[0], -1, -1)))
        for layer in self.layers:
            q = layer(q, features)
        return self.language_projection(q)
