"""Shard writers: what is written is what is read back; what is skipped is reported with why."""

import csv
import io
import json
import tarfile

import pytest
from PIL import Image

from vlm.data.pipeline import ImageTextShards
from vlm.data.writers import from_coco_captions, from_image_folder, from_vqa, write_shards


def make_images(folder, n):
    folder.mkdir(exist_ok=True)
    names = []
    for i in range(n):
        name = f"img.{i}.jpg" if i % 2 else f"img{i}.png"  # a dot in the name must not break keys
        Image.new("RGB", (6, 5), (i * 30, 100, 0)).save(folder / name)
        names.append(name)
    return names


def tar_members(shards):
    """(key, extension) -> bytes, read with the standard library, not the reader under test."""
    members = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                members[key, ext] = tar.extractfile(member).read()
    return members


def test_image_folder_jsonl_round_trip_and_summary(tmp_path):
    names = make_images(tmp_path / "images", 7)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    rows = [{"image": n, "caption": f"caption {i}"} for i, n in enumerate(names)]
    rows += [
        {"image": "gone.png", "caption": "missing file"},
        {"image": names[0], "caption": "  "},
        {"image": "broken.jpg", "caption": "corrupt"},
        {"image": names[1], "captions": ["first", "second"]},
    ]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    summary = write_shards(
        from_image_folder(tmp_path / "images", tmp_path / "caps.jsonl"), tmp_path / "out", samples_per_shard=3
    )
    assert summary.written == 8 and len(summary.shards) == 3
    assert dict(summary.skipped) == {"missing_image": 1, "missing_text": 1, "not_an_image": 1}
    assert "gone.png" in summary.report()
    assert not list((tmp_path / "out").glob("*.tmp"))  # every shard completed and renamed

    members = tar_members(summary.shards)
    for i, name in enumerate(names):
        ext = name.rsplit(".", 1)[1]
        assert members[f"{i:09d}", ext] == (tmp_path / "images" / name).read_bytes()
        assert json.loads(members[f"{i:09d}", "json"]) == {"caption": f"caption {i}"}
    assert json.loads(members[f"{7:09d}", "json"]) == {"captions": ["first", "second"]}

    read = {s["key"]: s for s in ImageTextShards(summary.shards, shuffle_buffer=0)}
    assert len(read) == 8 and read[f"{3:09d}"]["text"] == {"caption": "caption 3"}
    assert read[f"{2:09d}"]["image"].getpixel((0, 0)) == (60, 100, 0)


def test_csv_and_num_shards(tmp_path):
    names = make_images(tmp_path / "images", 10)
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows({"image": n, "caption": f"c{i}"} for i, n in enumerate(names))
    records = list(from_image_folder(tmp_path / "images", tmp_path / "caps.csv"))
    summary = write_shards(records, tmp_path / "out", num_shards=4, total=len(records))
    assert summary.written == 10 and len(summary.shards) == 4


def test_coco_captions_group_by_image(tmp_path):
    make_images(tmp_path / "images", 2)
    coco = {
        "images": [
            {"id": 1, "file_name": "img0.png"},
            {"id": 2, "file_name": "img.1.jpg"},
            {"id": 3, "file_name": "x.png"},
        ],
        "annotations": [
            {"image_id": 1, "caption": "a red thing"},
            {"image_id": 1, "caption": "something red"},
            {"image_id": 2, "caption": "green"},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    summary = write_shards(from_coco_captions(tmp_path / "coco.json", tmp_path / "images"), tmp_path / "out")
    assert summary.written == 2 and dict(summary.skipped) == {"missing_text": 1}
    texts = sorted(
        (s["text"] for s in ImageTextShards(summary.shards, shuffle_buffer=0)), key=lambda t: t["image_id"]
    )
    assert texts == [
        {"captions": ["a red thing", "something red"], "image_id": 1},
        {"caption": "green", "image_id": 2},
    ]


def test_vqa_records(tmp_path):
    make_images(tmp_path / "images", 1)
    rows = [
        {"image": "img0.png", "question": "what color?", "answers": ["red", "red", "dark red"]},
        {"image": "img0.png", "question": "", "answers": ["x"]},
    ]
    (tmp_path / "vqa.json").write_text(json.dumps(rows))
    summary = write_shards(from_vqa(tmp_path / "vqa.json", tmp_path / "images"), tmp_path / "out")
    assert summary.written == 1 and dict(summary.skipped) == {"missing_text": 1}
    (sample,) = ImageTextShards(summary.shards, shuffle_buffer=0)
    assert sample["text"] == {"question": "what color?", "answers": ["red", "red", "dark red"]}
    image = Image.open(io.BytesIO((tmp_path / "images" / "img0.png").read_bytes()))
    assert sample["image"].tobytes() == image.convert("RGB").tobytes()


def test_an_interrupted_write_leaves_no_partial_shard(tmp_path):
    names = make_images(tmp_path / "images", 5)

    def records():
        for name in names[:3]:
            yield from from_image_folder(tmp_path / "images", _jsonl(tmp_path, [name]))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(records(), tmp_path / "out", samples_per_shard=2)
    assert [p.name for p in sorted((tmp_path / "out").iterdir())] == ["shard-000000.tar"]  # complete one kept


def _jsonl(tmp_path, names):
    path = tmp_path / f"{names[0]}.jsonl"
    path.write_text("\n".join(json.dumps({"image": n, "caption": "c"}) for n in names))
    return path
