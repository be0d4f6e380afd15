"""Encoder-aware image transforms (torchvision v2): the encoder's size, mean and std."""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from vlm.config import RESIZE_MODES


class PadToSquare(torch.nn.Module):
    """Pads the short side evenly with ``fill`` (LLaVA's ``expand2square``: fill = mean colour)."""

    def __init__(self, fill: list[int]):
        super().__init__()
        self.fill = fill

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        side = max(height, width)
        left, top = (side - width) // 2, (side - height) // 2
        return TF.pad(image, [left, top, side - width - left, side - height - top], fill=self.fill)


class CenterCrop(torch.nn.Module):
    """A centre crop to ``size`` x ``size`` whose offsets round down, as transformers' image
    processors place it (so LLaVA's, BLIP-2's and IDEFICS's inputs, and exported models', are
    vlm's pixel for pixel). torchvision's rounds half to even: a pixel apart for some odd margins."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        top, left = (height - self.size) // 2, (width - self.size) // 2
        return TF.crop(image, top, left, self.size, self.size)


def image_transform(
    size: int, mean: tuple[float, ...], std: tuple[float, ...], *, mode: str = "crop"
) -> v2.Compose:
    """PIL image -> normalised float tensor ``(3, size, size)``.

    Args:
        mode: ``"crop"`` resizes the short side to ``size`` and centre-crops (CLIP);
            ``"pad"`` pads to a square with the mean colour, then resizes (LLaVA).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    bicubic = InterpolationMode.BICUBIC
    if mode == "crop":
        geometry = [v2.Resize(size, interpolation=bicubic, antialias=True), CenterCrop(size)]
    else:
        fill = [round(255 * m) for m in mean]
        geometry = [PadToSquare(fill), v2.Resize((size, size), interpolation=bicubic, antialias=True)]
    return v2.Compose(
        [v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    )


def encoder_transform(encoder, *, mode: str = "crop") -> v2.Compose:
    """The transform an encoder expects (its ``image_size``, ``mean`` and ``std``)."""
    return image_transform(encoder.image_size, encoder.mean, encoder.std, mode=mode)
