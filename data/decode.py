"""Robust image decoding: whatever the bytes, either an RGB image or a named reason to skip.

Training streams millions of images of every kind; one bad file must never stop a run.
``decode_image`` applies the EXIF orientation, converts every mode to RGB (transparency
composited on white, 16-bit scaled, CMYK converted) and turns each failure into
``BadSample(reason)``; ``DecodeStats`` counts what happened.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

#: Default decompression-bomb limit, in pixels (Pillow's own default is about 89 M).
MAX_PIXELS = 64_000_000

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class BadSample(Exception):
    """A sample to skip; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class DecodeStats:
    """What one pass over the data yielded, converted and skipped."""

    ok: int = 0
    converted: Counter = field(default_factory=Counter)  # source mode -> count
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def merge(self, other: DecodeStats) -> None:
        self.ok += other.ok
        self.converted.update(other.converted)
        self.skipped.update(other.skipped)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "converted": dict(self.converted), "skipped": dict(self.skipped)}

    def skipped_counts(self) -> str:
        """``"empty 1, truncated 2"``: the skips by reason, or ``""``."""
        return ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))

    def summary(self) -> str:
        converted = ", ".join(f"{k} {v}" for k, v in sorted(self.converted.items())) or "none"
        return (
            f"{self.ok} samples ok; converted to RGB: {converted}; skipped: {self.skipped_counts() or 'none'}"
        )


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _sixteen_bit(image: Image.Image) -> Image.Image:
    """Scales 16-bit (or 32-bit integer) grey to 8 bits; Pillow's convert would clip instead."""
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
    grey = np.clip(np.rint(array * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """The image in RGB, and the mode it was converted from (``None`` if it was RGB)."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode == "P":
        has_alpha = "transparency" in image.info
        return (_on_white(image) if has_alpha else image.convert("RGB")), "P"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return _on_white(image), mode
    if mode.startswith("I"):  # I, I;16, I;16B, I;16L ...
        return _sixteen_bit(image), mode
    return image.convert("RGB"), mode  # L, 1, CMYK, YCbCr, LAB, HSV, F


def upright_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """What :func:`decode_image` makes of an opened image: its EXIF orientation applied, then
    :func:`to_rgb`. The one conversion for images from files, URLs and Python callers alike
    (``Predictor`` takes PIL images in any mode)."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def decode_image(
    data: bytes, *, max_pixels: int = MAX_PIXELS, draft_size: int | None = None
) -> tuple[Image.Image, str | None]:
    """Decodes image bytes to RGB with the EXIF orientation applied.

    ``draft_size``: a JPEG at least twice that size on its short side is decoded at 1/2, 1/4
    or 1/8 scale by the JPEG decoder itself (Pillow's draft mode), to the smallest scale whose
    short side is still ``draft_size`` or more: for an encoder of that size, the transform's
    resize then starts from fewer pixels. Other formats decode in full.

    Returns the image and the mode it was converted from (``None`` for RGB sources).
    Never raises anything but ``BadSample``, whatever the bytes: its reason is one of
    :data:`DECODE_REASONS`.
    """
    if not data:
        raise BadSample("empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns about odd metadata (bad EXIF, unknown chunks); the pixels decide.
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(data, max_pixels, draft_size)
    except BadSample:
        raise
    except UnidentifiedImageError as err:
        raise BadSample("not_an_image", str(err)) from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("too_large", str(err)) from err
    except Exception as err:  # noqa: BLE001 - any class a broken file makes a decoder raise
        raise BadSample(_broken_reason(err), f"{type(err).__name__}: {err}") from err


#: Every reason :func:`decode_image` gives.
DECODE_REASONS = ("empty", "not_an_image", "too_large", "truncated", "corrupt")


def _decode(data: bytes, max_pixels: int, draft_size: int | None = None) -> tuple[Image.Image, str | None]:
    image = Image.open(io.BytesIO(data))  # reads the header only; a cut header raises here
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample("too_large", f"{width}x{height} is over {max_pixels} pixels")
    if draft_size is not None and image.format == "JPEG":
        # Both sides at least draft_size: the short side, whatever the EXIF orientation.
        image.draft(None, (draft_size, draft_size))
    image.load()  # a cut body shows only when the pixels are read
    return upright_rgb(image)


def _broken_reason(err: Exception) -> str:
    """``truncated`` when the bytes end too early, ``corrupt`` for any other broken content."""
    message = str(err).lower()
    ended = isinstance(err, EOFError) or any(
        hint in message for hint in ("truncated", "end of file", "not enough data", "buffer is not large")
    )
    return "truncated" if ended else "corrupt"
