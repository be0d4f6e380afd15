"""Every kind of image a crawl contains decodes to RGB correctly, or is skipped with a reason."""

import io

import numpy as np
import pytest
from PIL import Image

from vlm.data.decode import BadSample, decode_image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def pixel(image: Image.Image, xy=(0, 0)) -> tuple:
    return image.convert("RGB").getpixel(xy)


def test_rgb_passes_through_unconverted():
    image, converted = decode_image(encode(Image.new("RGB", (4, 3), (10, 20, 30))))
    assert converted is None and image.mode == "RGB" and image.size == (4, 3)
    assert pixel(image) == (10, 20, 30)


def test_exif_orientation_is_applied():
    source = Image.new("RGB", (8, 4), (255, 0, 0))
    source.paste((0, 0, 255), (0, 0, 4, 4))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    image, _ = decode_image(encode(source, "JPEG", exif=exif, quality=95))
    assert image.size == (4, 8)
    top = pixel(image, (2, 1))
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


def test_palette_transparency_is_composited_on_white():
    source = Image.new("P", (2, 1))
    source.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    source.putpixel((0, 0), 0)
    source.putpixel((1, 0), 1)
    source.info["transparency"] = 0
    image, converted = decode_image(encode(source, transparency=0))
    assert converted == "P"
    assert pixel(image, (0, 0)) == (255, 255, 255) and pixel(image, (1, 0)) == (200, 0, 0)


@pytest.mark.parametrize(
    "mode, transparent, opaque", [("RGBA", (9, 9, 9, 0), (0, 128, 0, 255)), ("LA", (9, 0), (60, 255))]
)
def test_alpha_is_composited_on_white(mode, transparent, opaque):
    source = Image.new(mode, (2, 1), transparent)
    source.putpixel((1, 0), opaque)
    image, converted = decode_image(encode(source))
    assert converted == mode
    assert pixel(image, (0, 0)) == (255, 255, 255)
    assert pixel(image, (1, 0)) == ((0, 128, 0) if mode == "RGBA" else (60, 60, 60))


def test_cmyk_converts_to_rgb():
    image, converted = decode_image(encode(Image.new("CMYK", (2, 2), (0, 255, 255, 0)), "JPEG"))
    assert converted == "CMYK"
    r, g, b = pixel(image)
    assert r > 200 and g < 60 and b < 60  # pure magenta + yellow ink is red


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    image, converted = decode_image(encode(Image.fromarray(values)))
    assert converted is not None and converted.startswith("I")
    assert [pixel(image, (x, 0))[0] for x in range(3)] == [0, 128, 255]


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grey_and_bilevel_become_rgb(mode):
    image, converted = decode_image(encode(Image.new(mode, (2, 2), 1 if mode == "1" else 77)))
    assert converted == mode and image.mode == "RGB"
    assert pixel(image) == ((255,) * 3 if mode == "1" else (77,) * 3)


def test_bad_bytes_raise_a_named_reason():
    jpeg = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    cases = {"empty": b"", "not_an_image": b"this is text, not an image", "truncated": jpeg[: len(jpeg) // 2]}
    for reason, data in cases.items():
        with pytest.raises(BadSample) as err:
            decode_image(data)
        assert err.value.reason == reason


def test_decompression_bomb_limit():
    data = encode(Image.new("L", (100, 100)))
    assert decode_image(data, max_pixels=10_000)[0].size == (100, 100)
    with pytest.raises(BadSample) as err:
        decode_image(data, max_pixels=9_999)
    assert err.value.reason == "too_large"
