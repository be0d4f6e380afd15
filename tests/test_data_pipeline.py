"""Streaming shards: bad samples are skipped and counted, every good one is read exactly once."""

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from vlm.cli import main
from vlm.data.commands import check
from vlm.data.pipeline import ImageTextShards, expand_shards


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption(text: str) -> bytes:
    return json.dumps({"caption": text}).encode()


def write_tar(path, samples):
    with wds.TarWriter(str(path)) as tar:
        for sample in samples:
            tar.write(sample)


def good_samples(n, start=0):
    return [
        {
            "__key__": f"{i:06d}",
            "png": png(Image.new("RGB", (8, 8), (i % 256, 0, 0))),
            "json": caption(f"red {i}"),
        }
        for i in range(start, start + n)
    ]


def bmp_with_zero_width() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="BMP")
    data = bytearray(buffer.getvalue())
    data[18:22] = (0).to_bytes(4, "little")  # BITMAPINFOHEADER width: no BMP Pillow can open
    return bytes(data)


@pytest.fixture
def messy_shards(tmp_path):
    """Two shards: 7 good RGB samples, 5 that need converting, 11 that must be skipped."""
    jpeg = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(jpeg, format="JPEG")
    jpeg = jpeg.getvalue()
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    palette = Image.new("P", (4, 4))
    palette.info["transparency"] = 0
    sixteen = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = io.BytesIO()
    Image.new("RGB", (8, 4)).save(rotated, format="JPEG", exif=exif)
    cmyk = io.BytesIO()
    Image.new("CMYK", (4, 4)).save(cmyk, format="JPEG")
    webp = io.BytesIO()
    Image.new("RGB", (8, 8)).save(webp, format="WEBP")
    webp = webp.getvalue()
    convert = [
        {"__key__": "rgba", "png": png(rgba), "json": caption("rgba")},
        {"__key__": "palette", "png": png(palette), "json": caption("palette")},
        {"__key__": "sixteen", "png": png(sixteen), "json": caption("sixteen")},
        {"__key__": "grey", "png": png(Image.new("L", (4, 4), 9)), "txt": b"grey"},
        {"__key__": "cmyk", "jpg": cmyk.getvalue(), "json": caption("cmyk")},
    ]
    bad = [
        {"__key__": "truncated", "jpg": jpeg[: len(jpeg) // 2], "json": caption("truncated")},
        {"__key__": "empty", "jpg": b"", "json": caption("empty")},
        {"__key__": "notimage", "jpg": b"<html>404</html>", "json": caption("not an image")},
        {"__key__": "notext", "png": png(Image.new("RGB", (4, 4)))},
        {"__key__": "bomb", "png": png(Image.new("L", (300, 300))), "json": caption("bomb")},
        {"__key__": "badjson", "png": png(Image.new("RGB", (4, 4))), "json": b"{not json"},
        # Bytes that end inside the header: Pillow raises at open(), not at load().
        {"__key__": "cutheader", "png": png(Image.new("RGB", (8, 8)))[:20], "json": caption("cut")},
        {"__key__": "cutmarker", "jpg": jpeg[:30], "json": caption("cut in a marker")},
        {"__key__": "cutwebp", "webp": webp[:20], "json": caption("cut webp")},
        {"__key__": "baddims", "bmp": bmp_with_zero_width(), "json": caption("0 x 8")},
        {"__key__": "noimage", "json": caption("the image is missing")},
    ]
    good = good_samples(6)
    good.append({"__key__": "rotated", "jpg": rotated.getvalue(), "json": caption("rotated")})
    write_tar(tmp_path / "a.tar", good[:4] + convert[:3] + bad[:3] + bad[6:9])
    write_tar(tmp_path / "b.tar", good[4:] + convert[3:] + bad[3:6] + bad[9:])
    return tmp_path


def test_bad_samples_are_skipped_converted_and_counted(messy_shards):
    dataset = ImageTextShards(str(messy_shards), shuffle_buffer=0, max_pixels=250 * 250)
    samples = list(dataset)
    keys = Counter(s["key"] for s in samples)
    expected = {f"{i:06d}" for i in range(6)} | {"rotated", "rgba", "palette", "sixteen", "grey", "cmyk"}
    assert set(keys) == expected and max(keys.values()) == 1
    assert all(s["image"].mode == "RGB" for s in samples)
    by_key = {s["key"]: s for s in samples}
    assert by_key["rotated"]["image"].size == (4, 8)
    assert by_key["rgba"]["image"].getpixel((0, 0)) == (255, 255, 255)
    assert by_key["grey"]["text"] == {"caption": "grey"}
    stats = dataset.stats
    assert stats.ok == len(expected)
    assert dict(stats.skipped) == {
        "truncated": 3,
        "corrupt": 1,
        "empty": 1,
        "not_an_image": 2,
        "missing_text": 1,
        "missing_image": 1,
        "too_large": 1,
        "bad_text": 1,
    }
    assert dict(stats.converted) == {"RGBA": 1, "P": 1, "I;16": 1, "L": 1, "CMYK": 1}


def test_data_check_counts_add_up_to_the_samples_in_the_shards(messy_shards, capsys):
    report = check([str(messy_shards)], as_json=True, max_pixels=250 * 250)
    printed = json.loads(capsys.readouterr().out)
    in_shards = 0
    for shard in messy_shards.glob("*.tar"):
        with tarfile.open(shard) as tar:
            in_shards += len({name.split(".")[0] for name in tar.getnames()})
    assert printed["ok"] == report["ok"] == 12 and in_shards == 23
    assert printed["ok"] + sum(printed["skipped"].values()) == in_shards
    # the command line says the same, and exits 1: some samples are skipped
    assert main(["data", "check", str(messy_shards), "--json", "--max-pixels", str(250 * 250)]) == 1
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == printed


def consume(dataset, num_workers):
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=lambda s: s["key"])
    return list(loader)


@pytest.fixture
def eight_shards(tmp_path):
    for shard in range(8):
        write_tar(tmp_path / f"s-{shard:02d}.tar", good_samples(5, start=shard * 5))
    return tmp_path


def test_two_workers_two_ranks_cover_the_epoch_exactly_once(eight_shards):
    seen = []
    for rank in range(2):
        dataset = ImageTextShards(str(eight_shards), rank=rank, world_size=2, seed=3, shuffle_buffer=4)
        seen += consume(dataset, num_workers=2)
    assert len(seen) == 40 and set(seen) == {f"{i:06d}" for i in range(40)}


def test_same_seed_same_order_and_epochs_reshuffle(eight_shards):
    def order(seed, epoch=0):
        dataset = ImageTextShards(str(eight_shards), seed=seed, shuffle_buffer=10)
        dataset.set_epoch(epoch)
        return [s["key"] for s in dataset]

    first = order(seed=1)
    assert first == order(seed=1)
    assert sorted(first) == sorted(order(seed=2)) and first != order(seed=2)
    assert first != order(seed=1, epoch=1)


def test_resampled_mode_streams_forever(eight_shards):
    dataset = ImageTextShards(str(eight_shards), resampled=True, shuffle_buffer=0)
    stream = iter(dataset)
    keys = [next(stream)["key"] for _ in range(100)]  # more than one epoch's 40
    assert len(keys) == 100 and set(keys) <= {f"{i:06d}" for i in range(40)}


def test_pipe_urls_and_brace_patterns(eight_shards):
    piped = ImageTextShards(f"pipe:cat {eight_shards}/s-00.tar", shuffle_buffer=0)
    assert [s["key"] for s in piped] == [f"{i:06d}" for i in range(5)]
    assert len(expand_shards(f"{eight_shards}/s-{{00..03}}.tar")) == 4
    assert len(expand_shards(f"{eight_shards}/*.tar")) == 8
    with pytest.raises(FileNotFoundError, match="no shard"):
        expand_shards(f"{eight_shards}/missing.tar")


def test_several_images_per_sample_keep_their_order(tmp_path):
    sample = {
        "__key__": "pair",
        "0.png": png(Image.new("RGB", (4, 4), (255, 0, 0))),
        "1.png": png(Image.new("RGB", (4, 4), (0, 0, 255))),
        "json": caption("two"),
    }
    write_tar(tmp_path / "m.tar", [sample])
    (got,) = list(ImageTextShards(str(tmp_path / "m.tar"), shuffle_buffer=0))
    assert [im.getpixel((0, 0)) for im in got["images"]] == [(255, 0, 0), (0, 0, 255)]
