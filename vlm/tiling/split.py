"""Image splitting (Idefics3, SmolVLM): the longest edge resized to a fixed length, both sides
up to whole tiles, row-major tiles and then the whole image squashed into one global tile;
each tile is marked in the text with its row and column."""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image
from torch import Tensor

from vlm.registry import register_tiling
from vlm.schema import ConfigError
from vlm.tiling.base import Size, Tiling, grid_tiles, resize, to_uint8

MAX_SIDE = 4096  # no side beyond this, as Idefics3's processor caps it

FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"


def marker_tokens(max_side: int) -> list[str]:
    """The tokens split tiling's text marks images with, for grids up to ``max_side`` tiles a
    side: a tokenizer needs them as single tokens (Idefics3's processor adds them)."""
    cells = [f"<row_{r}_col_{c}>" for r in range(1, max_side + 1) for c in range(1, max_side + 1)]
    return [FAKE, GLOBAL, *cells]


@dataclass
class SplitConfig:
    """How images are split into tiles and marked in the text.

    Args:
        longest_edge: the image's longest edge is resized to this (small images are scaled
            up), then both sides up to multiples of the tile size; ``None``: 4 tiles.
        resample: ``"lanczos"`` (Idefics3, SmolVLM) or ``"bicubic"``.
        max_tiles: at most this many tiles per image, the global one included: a larger image
            is resized to a shorter longest edge (by whole tiles) until it fits. ``None``: no bound.
        markers: Idefics3's text around each tile (``<fake_token_around_image><row_r_col_c>``,
            a newline after each row, ``<global-img>`` before the global image); ``False``:
            placeholders only.
    """

    name: str = "split"
    longest_edge: int | None = None
    resample: str = "lanczos"
    max_tiles: int | None = None
    markers: bool = True


def resized_size(size: Size, longest: int) -> tuple[int, int]:
    """The longest edge set to ``longest``, the other truncated and made even, capped at 4096."""
    height, width = size
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    if width >= height and width > MAX_SIDE:
        width, height = MAX_SIDE, int(MAX_SIDE / aspect)
    elif height > width and height > MAX_SIDE:
        height, width = MAX_SIDE, int(MAX_SIDE * aspect)
    return max(height, 1), max(width, 1)


def whole_tiles(size: Size, tile: int) -> tuple[int, int]:
    """Both sides up to multiples of ``tile``, the shorter following the aspect ratio."""
    height, width = size
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


@register_tiling("split", SplitConfig)
class Split(Tiling):
    def __init__(self, config: SplitConfig, *, text_dim=None, **options):
        super().__init__(config, **options)
        tile_size = self.tile_size
        if config.resample not in ("lanczos", "bicubic"):
            raise ConfigError(
                f"processor.tiling.resample must be 'lanczos' or 'bicubic', got {config.resample!r}"
            )
        self.longest_edge = config.longest_edge or 4 * tile_size
        if self.longest_edge < tile_size:
            raise ConfigError(
                f"processor.tiling.longest_edge={self.longest_edge} is below the tile size {tile_size}"
            )
        if config.max_tiles is not None and config.max_tiles < 1:
            raise ConfigError(f"processor.tiling.max_tiles must be >= 1, got {config.max_tiles}")

    def _grid_at(self, size: Size, longest: int) -> tuple[int, int]:
        height, width = whole_tiles(resized_size(size, longest), self.tile_size)
        if height <= self.tile_size and width <= self.tile_size:
            return 0, 0
        return height // self.tile_size, width // self.tile_size

    def longest(self, size: Size) -> int:
        """The longest edge an image of ``size`` is resized to: ``longest_edge``, shortened by
        whole tiles while the image would take more than ``max_tiles``."""
        longest, limit = self.longest_edge, self.config.max_tiles
        while limit is not None and longest > self.tile_size:
            rows, cols = self._grid_at(size, longest)
            if rows * cols + 1 <= limit:
                break
            longest -= self.tile_size
        return longest

    def tile_grid(self, size: Size) -> tuple[int, int]:
        """Rows and columns of tiles; ``(0, 0)`` for an image no larger than one tile."""
        return self._grid_at(size, self.longest(size))

    def num_tiles(self, size: Size) -> int:
        rows, cols = self.tile_grid(size)
        return rows * cols + 1  # the global image last

    def cut(self, image: Image.Image) -> list[Tensor]:
        pixels = to_uint8(image)
        size = tuple(pixels.shape[-2:])
        method = self.config.resample
        pixels = resize(pixels, *resized_size(size, self.longest(size)), method)
        rows, _ = self.tile_grid(size)
        if not rows:
            return [resize(pixels, self.tile_size, self.tile_size, method)]
        pixels = resize(pixels, *whole_tiles(tuple(pixels.shape[-2:]), self.tile_size), method)
        return [*grid_tiles(pixels, self.tile_size), resize(pixels, self.tile_size, self.tile_size, method)]

    def arrange_all(self, visual: Tensor, sizes) -> Tensor:
        # Tiles keep their tokens in order: the sizes only count them (Idefics3's inputs have none).
        return visual.flatten(0, 1) if sizes is None else super().arrange_all(visual, sizes)

    def text(self, size: Size, image_token: str) -> str | None:
        if not self.config.markers:
            return None
        tokens = image_token * self.tokens_per_tile
        rows, cols = self.tile_grid(size)
        tiles = "".join(
            "".join(f"{FAKE}<row_{r + 1}_col_{c + 1}>{tokens}" for c in range(cols)) + "\n"
            for r in range(rows)
        )
        return tiles + ("\n" if rows else "") + f"{FAKE}{GLOBAL}{tokens}{FAKE}"
