"""Fuzzing the decoder: every cut and every flipped byte of every format decodes to RGB or is a
named skip. Nothing else may escape ``decode_image``: one crash here is one dead training run."""

import io
import random

import numpy as np
import pytest
from PIL import Image

from vlm.data.decode import DECODE_REASONS, BadSample, decode_image

FORMATS = {
    "JPEG": {"quality": 80},
    "PNG": {},
    "WEBP": {"quality": 80},
    "GIF": {},
    "BMP": {},
    "TIFF": {"compression": "tiff_deflate"},
}
FLIPS_PER_FORMAT = 400
# Small, so a flipped header that claims a huge size is refused instead of allocated.
MAX_PIXELS = 1 << 20


def good_image(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    pixels[:, :10] = (200, 30, 30)  # half flat, half noise: both kinds of compressed stream
    image = Image.fromarray(pixels)
    if fmt == "GIF":
        image = image.quantize(16)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **FORMATS[fmt])
    return buffer.getvalue()


def cases(data: bytes, seed: int):
    """Every prefix of the file, then random flips of 1 to 8 bytes."""
    for cut in range(len(data)):
        yield f"cut at {cut}", data[:cut]
    rng = random.Random(seed)
    for i in range(FLIPS_PER_FORMAT):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        yield f"flip {i}", bytes(flipped)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_cut_and_flip_decodes_or_is_a_named_skip(fmt):
    data = good_image(fmt)
    image, _ = decode_image(data)
    assert image.mode == "RGB" and image.size == (20, 12)
    outcomes, crashes = {"ok": 0}, []
    for name, case in cases(data, seed=len(fmt)):
        try:
            image, _ = decode_image(case, max_pixels=MAX_PIXELS)
        except BadSample as bad:
            assert bad.reason in DECODE_REASONS, (name, bad.reason)
            outcomes[bad.reason] = outcomes.get(bad.reason, 0) + 1
            continue
        except Exception as err:  # noqa: BLE001 - a crash: what the test is looking for
            crashes.append(f"{name}: {type(err).__name__}: {err}")
            continue
        assert image.mode == "RGB" and image.width > 0 and image.height > 0, name
        outcomes["ok"] += 1
    assert not crashes, f"{len(crashes)} crashes, e.g. {crashes[:3]}"
    assert sum(outcomes.values()) == len(data) + FLIPS_PER_FORMAT
    # Most cuts cannot decode (the header or the pixels are missing): they are skips, not images.
    assert sum(outcomes.values()) - outcomes["ok"] > len(data) // 2, outcomes
