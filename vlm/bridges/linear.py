"""LLaVA's projectors: ``linear`` and ``mlp2x_gelu`` (Linear, GELU, Linear)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from vlm.bridges.base import Bridge
from vlm.registry import register_bridge


@dataclass
class ProjectorConfig:
    """A per-token projection of image features into the LM's embedding space.

    Args:
        name: ``"linear"`` (one Linear) or ``"mlp2x_gelu"`` (Linear, GELU, Linear).
        bias: biases on the linear layers.
    """

    name: str = "mlp2x_gelu"
    bias: bool = True


@register_bridge("linear", ProjectorConfig)
@register_bridge("mlp2x_gelu", ProjectorConfig)
class Projector(Bridge):
    def __init__(self, config: ProjectorConfig, *, vision_dim: int, text_dim: int, text_layers: int):
        super().__init__()
        self.config = config
        # Names follow transformers' LlavaMultiModalProjector so weights map one to one.
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=config.bias)
        if config.name == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text_dim, text_dim, bias=config.bias)
        else:
            self.act = self.linear_2 = None

    def tokens_per_image(self, num_features: int) -> int:
        return num_features

    def forward(self, features: Tensor) -> Tensor:  # (N, T, Dv) -> (N, T, D_lm)
        x = self.linear_1(features)
        if self.linear_2 is not None:
            x = self.linear_2(self.act(x))
        return x
