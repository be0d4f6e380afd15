"""AnyRes (LLaVA-NeXT, LLaVA-OneVision): a grid of tiles chosen from a list of resolutions,
after a downscaled base image; the tiles' token grid is unpadded back to the picture's aspect
and a learned newline embedding ends each row."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from vlm.registry import register_tiling
from vlm.schema import ConfigError
from vlm.tiling.base import Size, Tiling, grid_tiles, resize, to_uint8

#: LLaVA-NeXT's grids (rows x cols of tiles): 1x2, 2x1, 2x2, 3x1 and 1x3.
NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


@dataclass
class AnyResConfig:
    """How AnyRes picks a tile grid and lays out its tokens.

    Args:
        grids: the tile grids to choose from, ``[rows, cols]`` each, in order of preference
            on ties (LLaVA-NeXT's by default). Ignored when ``pinpoints`` is set.
        pinpoints: the resolutions to choose from in pixels, ``[height, width]`` each, as a
            checkpoint's ``image_grid_pinpoints`` lists them (multiples of the tile size).
        max_tiles: at most this many tiles per image, the base image included: the grids
            (or pinpoints) with more are not chosen. ``None``: no bound.
        max_tiles_features: OneVision's ``anyres_max_N``: when the unpadded token grid holds
            more than ``N`` tiles' worth (by a factor over 1.1), shrink it bilinearly to about
            ``N`` tiles' worth. ``None``: never.
        newline: a learned embedding after each row of the grid (LLaVA-NeXT's ``image_newline``).
    """

    name: str = "anyres"
    grids: list[list[int]] | None = None
    pinpoints: list[list[int]] | None = None
    max_tiles: int | None = None
    max_tiles_features: int | None = None
    newline: bool = True


def best_resolution(size: Size, pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """The pinpoint ``(height, width)`` that keeps most of the picture, then wastes least
    (transformers' ``select_best_resolution``: downscaled sides truncated, the earlier wins ties)."""
    height, width = size
    best, most, least = pinpoints[0], -1, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - kept
        if kept > most or (kept == most and wasted < least):
            best, most, least = (ph, pw), kept, wasted
    return best


def fitted_size(size: Size, target: tuple[int, int]) -> tuple[int, int]:
    """The picture resized into ``target`` keeping its aspect (transformers' ``get_patch_output_size``)."""
    (height, width), (th, tw) = size, target
    if tw / width < th / height:
        return min(math.ceil(height * tw / width), th), tw
    return th, min(math.ceil(width * th / height), tw)


def unpadded(rows: int, cols: int, size: Size) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the picture inside a ``rows x cols`` token grid whose
    tiles were padded to the pinpoint (``unpad_image``: rounded to 7 places, symmetric floor)."""
    height, width = size
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        return pad, rows - pad, 0, cols
    kept = int(round(width * (rows / height), 7))
    pad = (cols - kept) // 2
    return 0, rows, pad, cols - pad


@register_tiling("anyres", AnyResConfig)
class AnyRes(Tiling):
    def __init__(self, config: AnyResConfig, *, text_dim=None, **options):
        super().__init__(config, **options)
        tile_size, grid = self.tile_size, self.grid
        if config.pinpoints is not None:
            self.pinpoints = [tuple(p) for p in config.pinpoints]
            bad = [p for p in self.pinpoints if len(p) != 2 or p[0] % tile_size or p[1] % tile_size]
            if bad:
                raise ConfigError(
                    f"processor.tiling.pinpoints must be [height, width] multiples of the tile size "
                    f"{tile_size}; these are not: {bad}"
                )
        else:
            grids = [tuple(g) for g in (config.grids or NEXT_GRIDS)]
            if any(len(g) != 2 or min(g) < 1 for g in grids):
                raise ConfigError(f"processor.tiling.grids must be [rows, cols] pairs >= 1, got {grids}")
            self.pinpoints = [(r * tile_size, c * tile_size) for r, c in grids]
        if config.max_tiles is not None:
            tiles = {(h, w): (h // tile_size) * (w // tile_size) + 1 for h, w in self.pinpoints}
            fitting = [p for p in self.pinpoints if tiles[p] <= config.max_tiles]
            if not fitting:
                raise ConfigError(
                    f"processor.tiling.max_tiles={config.max_tiles} leaves no grid to choose from (each "
                    "takes its tiles plus the base image); raise it or add smaller grids"
                )
            self.pinpoints = fitting
        if config.max_tiles_features is not None and grid is None:
            raise ConfigError("processor.tiling.max_tiles_features needs a bridge with a token grid")
        self.image_newline = None
        if config.newline and grid is not None and text_dim is not None:
            # Initialised as LLaVA-NeXT's: normal with std 1/sqrt(hidden size).
            self.image_newline = nn.Parameter(torch.randn(text_dim) / math.sqrt(text_dim))

    def tile_grid(self, size: Size) -> tuple[int, int]:
        ph, pw = best_resolution(size, self.pinpoints)
        return ph // self.tile_size, pw // self.tile_size

    def num_tiles(self, size: Size) -> int:
        rows, cols = self.tile_grid(size)
        return 1 + rows * cols  # the base image first

    def flatten_inputs(
        self, pixel_values: Tensor, image_sizes: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """LLaVA-NeXT's ``(N_img, max_tiles, 3, H, W)``, zero-padded on the tile axis: each image's
        own tiles, as its size says."""
        if image_sizes is None:
            raise ValueError(
                "5-D pixel_values (LLaVA-NeXT's layout) need image_sizes, each image's (height, width)"
            )
        counts = [self.num_tiles(tuple(int(v) for v in s)) for s in image_sizes]
        return torch.cat([tiles[:n] for tiles, n in zip(pixel_values, counts)]), image_sizes

    def cut(self, image: Image.Image) -> list[Tensor]:
        pixels = to_uint8(image)
        size = tuple(pixels.shape[-2:])
        target = best_resolution(size, self.pinpoints)
        height, width = fitted_size(size, target)
        resized = resize(pixels, height, width)
        # Padded with black in pixel space (before normalising); an odd pixel goes bottom / right.
        left, top = (target[1] - width) // 2, (target[0] - height) // 2
        padded = F.pad(resized, (left, target[1] - width - left, top, target[0] - height - top))
        base = resize(pixels, self.tile_size, self.tile_size)
        return [base, *grid_tiles(padded, self.tile_size)]

    def _feature_grid(self, size: Size) -> tuple[int, int, tuple[int, int, int, int], tuple[int, int] | None]:
        """Token rows and cols of the tiles, the unpadded window, and the shrunk size (or None)."""
        rows, cols = self.tile_grid(size)
        h, w = self.grid
        window = unpadded(rows * h, cols * w, size)
        top, bottom, left, right = window
        shrunk = None
        limit = self.config.max_tiles_features
        if limit is not None:
            ratio = math.sqrt((bottom - top) * (right - left) / (limit * h * w))
            if ratio > 1.1:
                shrunk = (int((bottom - top) // ratio), int((right - left) // ratio))
        return rows * h, cols * w, window, shrunk

    def tokens(self, size: Size) -> int:
        if self.grid is None:  # tokens that are not a grid stay per tile
            return super().tokens(size)
        _, _, (top, bottom, left, right), shrunk = self._feature_grid(size)
        height, width = shrunk or (bottom - top, right - left)
        newlines = height if self.config.newline else 0
        return self.tokens_per_tile + height * width + newlines

    def arrange(self, tiles: Tensor, size: Size) -> Tensor:
        if self.grid is None:
            return tiles.flatten(0, 1)
        base, tiles = tiles[0], tiles[1:]
        rows, cols = self.tile_grid(size)
        h, w = self.grid
        D = tiles.shape[-1]
        # (rows*cols, h*w, D) -> (D, rows*h, cols*w): the tiles' token grids side by side.
        grid = tiles.view(rows, cols, h, w, D).permute(4, 0, 2, 1, 3).reshape(D, rows * h, cols * w)
        _, _, (top, bottom, left, right), shrunk = self._feature_grid(size)
        grid = grid[:, top:bottom, left:right]
        if shrunk is not None:
            grid = F.interpolate(grid[None], size=shrunk, mode="bilinear")[0]
        if self.config.newline:
            if self.image_newline is None:
                raise ValueError("this AnyRes tiling was built without its newline embedding (text_dim)")
            newline = self.image_newline.to(grid.dtype)[:, None, None].expand(D, grid.shape[1], 1)
            grid = torch.cat([grid, newline], dim=2)
        return torch.cat([base, grid.flatten(1).T])
