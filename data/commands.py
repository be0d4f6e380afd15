"""What ``vlm data ...`` runs: check shards, write shards, make the shapes dataset (the parsers
are in ``vlm.data.cli``; the ``*_command`` functions take their arguments)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlm.data.importers import from_karpathy, from_llava, from_mmc4, from_obelics, from_vqav2
from vlm.data.loader import TASKS, task_examples
from vlm.data.pipeline import ImageTextShards
from vlm.data.shapes import write_shapes
from vlm.data.writers import Drop, from_coco_captions, from_image_folder, from_vqa, write_shards


def check(shards: list[str], *, as_json: bool = False, max_pixels: int | None = None) -> dict:
    """Reads shards through the training decoder and reports what a run would get.

    Returns (and prints) ``{"ok": samples yielded, "skipped": {reason: n}, "converted":
    {mode: n}, "shards": n, "tasks": {task: examples}}``: the examples training draws for each
    of its tasks (``caption``, ``vqa``, ``chat``, ``document``; ``data.tasks``).
    """
    options = {"max_pixels": max_pixels} if max_pixels else {}
    dataset = ImageTextShards(shards, shuffle_shards=False, shuffle_buffer=0, rank=0, world_size=1, **options)
    tasks: Counter = Counter(dict.fromkeys(TASKS, 0))
    for sample in tqdm(dataset, desc="check", unit="sample", disable=as_json):
        tasks.update(example["task"] for example in task_examples(sample["text"]))
    stats = dataset.stats
    report = {
        "ok": stats.ok,
        "skipped": dict(stats.skipped),
        "converted": dict(stats.converted),
        "shards": len(dataset.urls),
        "tasks": dict(tasks),
    }
    if as_json:
        print(json.dumps(report))
    else:
        print(f"{len(dataset.urls)} shard(s): {stats.summary()}")
        print("examples per task: " + ", ".join(f"{task} {n}" for task, n in tasks.items()))
    return report


@dataclass(frozen=True)
class Source:
    """One source of ``vlm data write``: how to read it (``(value, images, **options) ->
    records``) and which of the shared options (``splits``, ``url_map``) it takes."""

    read: Callable[..., Iterable]
    options: tuple[str, ...] = ()


def _vqav2(files: str | list[str], images: str) -> Iterable:
    files = [files] if isinstance(files, str) else list(files)
    if len(files) == 1:
        raise ValueError(
            f"--vqav2 {files[0]}: give the annotations file too (--vqav2 QUESTIONS.json ANNOTATIONS.json). "
            "Test and test-dev questions have no answers (they are scored on the evaluation server), "
            "and the shards' readers need answers for every question: predict on test images with `vlm vqa`."
        )
    if len(files) != 2:
        raise ValueError(f"--vqav2 takes QUESTIONS.json ANNOTATIONS.json, got {len(files)} files")
    return from_vqav2(files[0], files[1], images)


#: The sources, by flag (``--coco-karpathy``: ``coco_karpathy``).
SOURCES: dict[str, Source] = {
    "captions": Source(lambda value, images: from_image_folder(images, value)),
    "coco": Source(lambda value, images: from_coco_captions(value, images)),
    "vqa": Source(lambda value, images: from_vqa(value, images)),
    "llava": Source(from_llava),
    "vqav2": Source(_vqav2),
    "coco_karpathy": Source(from_karpathy, ("splits",)),
    "obelics": Source(from_obelics, ("url_map",)),
    "mmc4": Source(from_mmc4, ("url_map",)),
}


#: The options some sources take, and their flags.
OPTION_FLAGS = {"splits": "--split", "url_map": "--url-map"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def write(
    *,
    out: str,
    images: str,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    num_shards: int | None = None,
    splits: list[str] | None = None,
    url_map: str | None = None,
    **sources: Any,
) -> dict:
    """Writes shards from exactly one source, given as ``flag_name=value`` (see
    :data:`SOURCES`: ``captions=``, ``llava=``, ``vqav2=[questions, annotations]``, ...).

    Args:
        splits: for ``coco_karpathy``: the splits to write (each may be comma-separated).
        url_map: for ``obelics`` / ``mmc4``: img2dataset's table of ``url`` -> ``key``.

    Returns (and prints the report of) the counts: ``written``, ``skipped`` and ``left_out``
    by reason, per kind of part (``parts``: ``questions``, ``images``) the same, and ``shards``.
    """
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown source(s) {sorted(unknown)}; sources are {', '.join(SOURCES)}")
    given = {name: value for name, value in sources.items() if value}
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(_flag(name) for name in SOURCES)}")
    ((name, value),) = given.items()
    source = SOURCES[name]
    options = {"splits": [s for v in splits or [] for s in v.split(",") if s] or None, "url_map": url_map}
    for option, setting in options.items():
        if setting and option not in source.options:
            raise ValueError(f"{OPTION_FLAGS[option]} does not go with {_flag(name)}")
    records: Iterable = source.read(value, images, **{k: options[k] for k in source.options})
    total = None
    if num_shards is not None:  # spreading over a number of shards needs the count first
        records = list(records)
        total = sum(not isinstance(r, Drop) for r in records)
    summary = write_shards(
        records, out, prefix=prefix, samples_per_shard=samples_per_shard, num_shards=num_shards, total=total
    )
    print(summary.report())
    return {
        "written": summary.written,
        "skipped": dict(summary.skipped),
        "left_out": dict(summary.left_out),
        "parts": {
            unit: {"written": c.written, "samples": c.samples, "skipped": dict(c.skipped)}
            for unit, c in summary.parts.items()
        },
        "shards": summary.shards,
    }


# --- the commands' handlers (``args`` from ``vlm.data.cli``) ---------------------------------


def check_command(args: argparse.Namespace) -> int:
    """Exit code 0 when every sample was read, 1 when some were skipped, 2 when none was."""
    report = check(args.shards, as_json=args.json, max_pixels=args.max_pixels)
    skipped = sum(report["skipped"].values())
    return 2 if not report["ok"] else 1 if skipped else 0


def write_command(args: argparse.Namespace) -> int:
    """Exit code 0 when everything was written, 1 when something was skipped (a record, or a
    question or image of one), 2 when nothing was written."""
    result = write(
        out=args.out,
        images=args.images,
        prefix=args.prefix,
        samples_per_shard=args.samples_per_shard,
        num_shards=args.num_shards,
        splits=args.splits,
        url_map=args.url_map,
        **{name: getattr(args, name) for name in SOURCES},
    )
    skipped = sum(result["skipped"].values()) + sum(
        sum(p["skipped"].values()) for p in result["parts"].values()
    )
    return 2 if not result["written"] else 1 if skipped else 0


def shapes_command(args: argparse.Namespace) -> int:
    """Writes the shapes dataset, or says that ``--out`` holds it already (same arguments)."""
    manifest_path = Path(args.out) / "shapes.json"
    before = _identity(manifest_path)
    manifest = write_shapes(
        args.out,
        seed=args.seed,
        train=args.train,
        val=args.val,
        test=args.test,
        image_size=args.image_size,
        canvas=args.canvas,
    )
    if before is not None and _identity(manifest_path) == before:  # write_shapes kept it
        print(
            f"vlm data shapes: {args.out} already holds this dataset (same arguments): skipping, "
            "nothing written; delete it, or give other arguments, to write it again",
            file=sys.stderr,
        )
    print(json.dumps({k: manifest[k] for k in ("counts", "held_out") if k in manifest}))
    return 0


def _identity(path: Path) -> tuple[int, int] | None:
    """The file's inode and modification time: unchanged when nobody rewrote it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns
