"""LLaVA's projectors: ``linear`` and ``mlp2x_gelu`` (Linear, GELU, Linear), with optional
token merging (pixel shuffle, as in Idefics3 / SmolVLM) to hand the LM fewer visual tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from vlm.bridges.base import PrefixBridge
from vlm.registry import register_bridge
from vlm.schema import ConfigError


@dataclass
class ProjectorConfig:
    """A per-token projection of image features into the LM's embedding space.

    Args:
        name: ``"linear"`` (one Linear) or ``"mlp2x_gelu"`` (Linear, GELU, Linear).
        bias: biases on the linear layers.
        merge: concatenate each ``merge x merge`` block of neighbouring patch tokens into one
            token before projecting (1 = off): ``merge**2`` times fewer visual tokens. Needs a
            square grid of patch tokens (no class token).
    """

    name: str = "mlp2x_gelu"
    bias: bool = True
    merge: int = 1


@register_bridge("linear", ProjectorConfig)
@register_bridge("mlp2x_gelu", ProjectorConfig)
class Projector(PrefixBridge):
    def __init__(self, config: ProjectorConfig, *, vision_dim: int, text_dim: int, text_layers: int):
        super().__init__()
        if config.merge < 1:
            raise ConfigError(f"bridge.merge must be >= 1, got {config.merge}")
        self.config = config
        vision_dim *= config.merge**2
        # Names follow transformers' LlavaMultiModalProjector so weights map one to one.
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=config.bias)
        if config.name == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text_dim, text_dim, bias=config.bias)
        else:
            self.act = self.linear_2 = None

    def tokens_per_image(self, num_features: int) -> int:
        self._grid(num_features)
        return num_features // self.config.merge**2

    def token_grid(self, num_features: int) -> tuple[int, int] | None:
        side = math.isqrt(num_features)
        if side * side != num_features:  # a class token among the patches
            return None
        return side // self.config.merge, side // self.config.merge

    def _grid(self, num_features: int) -> int:
        side, m = round(math.sqrt(num_features)), self.config.merge
        if m > 1 and (side * side != num_features or side % m):
            raise ConfigError(
                f"bridge.merge={m} needs a square grid of patch tokens whose side divides by {m}, "
                f"but the encoder gives {num_features} tokens (drop the class token, or change merge)"
            )
        return side

    def _merge(self, x: Tensor) -> Tensor:  # (N, s*s, D) -> (N, (s/m)^2, m*m*D)
        m = self.config.merge
        N, T, D = x.shape
        side = self._grid(T)
        x = x.reshape(N, side // m, m, side // m, m, D).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(N, (side // m) ** 2, m * m * D)

    def forward(self, features: Tensor) -> Tensor:  # (N, T, Dv) -> (N, T / merge^2, D_lm)
        if self.config.merge > 1:
            features = self._merge(features)
        x = self.linear_1(features)
        if self.linear_2 is not None:
            x = self.linear_2(self.act(x))
        return x
