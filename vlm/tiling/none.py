"""No tiling: each image is one square view at the encoder's size (the transform squares it)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image
from torch import Tensor

from vlm.registry import register_tiling
from vlm.tiling.base import Size, Tiling, to_uint8


@dataclass
class NoTilingConfig:
    name: str = "none"


@register_tiling("none", NoTilingConfig)
class NoTiling(Tiling):
    splits = False

    def cut(self, image: Image.Image) -> list[Tensor]:
        return [to_uint8(image)]

    def num_tiles(self, size: Size) -> int:
        return 1
