"""The tiling contract: how one image becomes tiles, text and visual tokens.

A tiling kind owns three things, and nothing else in vlm branches on the kind:

- :meth:`Tiling.cut`: a picture to the square tiles the encoder sees, in the order their
  features are arranged (``uint8`` tensors ``(3, tile, tile)``, before normalisation);
- :meth:`Tiling.image_ids` (through :meth:`Tiling.image_text` and :meth:`Tiling.num_tokens`):
  what one ``<image>`` marker expands into in the text, for an image of a given size;
- :meth:`Tiling.arrange`: the bridge's tokens of one image's tiles ``(n_tiles, M, D)`` to the
  tokens that take that image's placeholders ``(num_tokens, D)``.

Everything is a function of the image's original size ``(height, width)``: the processor
counts tokens from it without the model, and the model re-derives each image's grid from the
``image_sizes`` that travel with the batch (as transformers' LLaVA-NeXT does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

Size = tuple[int, int]  # (height, width) of the original image


class Tiling(nn.Module):
    """How images become the encoder's tiles (one square at ``tile_size`` without tiling).

    Args:
        config: the kind's dataclass (``ProcessorConfig.tiling``).
        tile_size: the encoder's input side in pixels.
        tokens_per_tile: the bridge's tokens for one tile (``model.tokens_per_image``).
        grid: the bridge's tokens of a tile as a ``(rows, cols)`` grid; ``None`` when they
            are not spatial (Q-Former queries, class tokens).
        text_dim: the LM's hidden size, for kinds with learned embeddings (AnyRes' newline);
            ``None`` builds no parameters (a processor's copy).
        marker_only: the bridge takes one placeholder per image whatever its tiles (a
            cross-attention bridge: the text after the image attends to all of its tiles);
            the image's text is then that one placeholder.
    """

    #: Whether an image can take more than one tile (cross-attention bridges refuse those kinds).
    splits = True

    def __init__(
        self,
        config,
        *,
        tile_size: int,
        tokens_per_tile: int,
        grid: tuple[int, int] | None = None,
        text_dim: int | None = None,
        marker_only: bool = False,
    ):
        super().__init__()
        self.config = config
        self.tile_size, self.tokens_per_tile, self.grid = tile_size, tokens_per_tile, grid
        self.marker_only = marker_only

    # The picture.
    def cut(self, image: Image.Image) -> list[Tensor]:
        """The image's tiles, ``uint8`` ``(3, H, W)`` each, in the order :meth:`arrange` reads."""
        raise NotImplementedError

    def num_tiles(self, size: Size) -> int:
        raise NotImplementedError

    # The text.
    def num_tokens(self, size: Size) -> int:
        """The image placeholders one image of ``size`` takes in ``input_ids``."""
        return 1 if self.marker_only else self.tokens(size)

    def image_text(self, size: Size, image_token: str) -> str | None:
        """The text one ``<image>`` marker becomes, when more than placeholders (row and column
        markers); ``None``: :meth:`num_tokens` placeholders."""
        return None if self.marker_only else self.text(size, image_token)

    def tokens(self, size: Size) -> int:
        """The kind's placeholders for an image of ``size`` (one run per tile by default)."""
        return self.num_tiles(size) * self.tokens_per_tile

    def text(self, size: Size, image_token: str) -> str | None:
        """The kind's text for an image of ``size``; ``None``: placeholders only."""
        return None

    def tile_counts(self, sizes: Sequence[Size] | Tensor | None) -> list[int]:
        """How many tiles each image of ``sizes`` takes."""
        if sizes is None:
            raise ValueError(
                f"this model cuts images into tiles ({self.config.name!r}): pass image_sizes, each "
                "image's (height, width), with the tiles' pixel_values"
            )
        return [self.num_tiles(tuple(int(v) for v in s)) for s in sizes]

    # The features.
    def arrange(self, tiles: Tensor, size: Size) -> Tensor:
        """One image's tiles as the bridge gives them ``(n_tiles, M, D)`` to its ``(num_tokens, D)``."""
        return tiles.flatten(0, 1)

    def flatten_inputs(
        self, pixel_values: Tensor, image_sizes: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """transformers' 5-D ``pixel_values`` ``(B, n, 3, H, W)`` to vlm's tiles ``(N_tiles, 3, H, W)``
        and image sizes. Default: every entry is a tile; all-zero entries pad a batch (Idefics3's
        padding images) and are dropped."""
        tiles = pixel_values.flatten(0, 1)
        real = tiles.flatten(1).ne(0).any(1)
        return tiles[real], image_sizes

    def arrange_all(self, visual: Tensor, sizes: Sequence[Size] | Tensor | None) -> Tensor:
        """The tiles of several images (reading order) to their placeholders' tokens, stacked."""
        counts = self.tile_counts(sizes)
        sizes = [tuple(int(v) for v in s) for s in sizes]
        if sum(counts) != visual.shape[0]:
            raise ValueError(
                f"{visual.shape[0]} tile(s) were given for {len(sizes)} image(s) whose sizes need "
                f"{sum(counts)}; pass image_sizes for the images whose tiles these are, in order"
            )
        return torch.cat([self.arrange(t, s) for t, s in zip(visual.split(counts), sizes)])


def to_uint8(image: Image.Image) -> Tensor:
    """A PIL image as ``uint8`` ``(3, H, W)``."""
    return TF.pil_to_tensor(image.convert("RGB"))


def resize(image: Tensor, height: int, width: int, method: str = "bicubic") -> Tensor:
    """``uint8`` resize with antialiasing, as transformers' fast image processors resize."""
    mode = {"bicubic": InterpolationMode.BICUBIC, "lanczos": InterpolationMode.LANCZOS}[method]
    if method == "lanczos":  # torchvision resizes tensors without LANCZOS: through PIL
        return TF.pil_to_tensor(TF.to_pil_image(image).resize((width, height), Image.Resampling.LANCZOS))
    return TF.resize(image, [height, width], interpolation=mode, antialias=True)


def grid_tiles(image: Tensor, tile: int) -> list[Tensor]:
    """Row-major ``tile`` x ``tile`` crops of an image whose sides are multiples of ``tile``."""
    height, width = image.shape[-2:]
    return [
        image[:, top : top + tile, left : left + tile]
        for top in range(0, height, tile)
        for left in range(0, width, tile)
    ]
