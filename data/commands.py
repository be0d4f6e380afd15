"""What ``vlm data ...`` runs: check shards, write shards, make the shapes dataset."""

from __future__ import annotations

import json
from collections import Counter

from tqdm import tqdm

from vlm.data.pipeline import ImageTextShards
from vlm.data.writers import from_coco_captions, from_image_folder, from_vqa, write_shards


def check(shards: list[str], *, as_json: bool = False, max_pixels: int | None = None) -> dict:
    """Reads shards through the training decoder and reports what a run would get.

    Returns (and prints) ``{"ok": samples yielded, "skipped": {reason: n}, "converted":
    {mode: n}, "shards": n, "tasks": {...}}``.
    """
    options = {"max_pixels": max_pixels} if max_pixels else {}
    dataset = ImageTextShards(shards, shuffle_shards=False, shuffle_buffer=0, rank=0, world_size=1, **options)
    kinds: Counter = Counter()
    for sample in tqdm(dataset, desc="check", unit="sample", disable=as_json):
        text = sample["text"]
        kinds["captions"] += bool(text.get("caption") or text.get("captions"))
        kinds["questions"] += len(text.get("qa", [])) + ("question" in text)
    stats = dataset.stats
    report = {
        "ok": stats.ok,
        "skipped": dict(stats.skipped),
        "converted": dict(stats.converted),
        "shards": len(dataset.urls),
        "tasks": dict(kinds),
    }
    if as_json:
        print(json.dumps(report))
    else:
        print(f"{len(dataset.urls)} shard(s): {stats.summary()}")
        print(f"samples with captions: {kinds['captions']}; questions: {kinds['questions']}")
    return report


def write(
    *,
    out: str,
    images: str,
    captions: str | None = None,
    coco: str | None = None,
    vqa: str | None = None,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    num_shards: int | None = None,
) -> dict:
    """Writes shards from exactly one source: captions (JSONL/CSV), COCO captions or VQA JSON."""
    sources = [s for s in (captions, coco, vqa) if s]
    if len(sources) != 1:
        raise ValueError("give exactly one of --captions, --coco, --vqa")
    if captions:
        records = list(from_image_folder(images, captions))
    elif coco:
        records = list(from_coco_captions(coco, images))
    else:
        records = list(from_vqa(vqa, images))
    summary = write_shards(
        records,
        out,
        prefix=prefix,
        samples_per_shard=samples_per_shard,
        num_shards=num_shards,
        total=len(records),
    )
    print(summary.report())
    return {"written": summary.written, "skipped": dict(summary.skipped), "shards": summary.shards}
