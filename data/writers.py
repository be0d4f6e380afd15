"""Shard writers: image-text pairs into webdataset tar shards.

A shard holds ``KEY.<ext>`` (the original image bytes, never re-encoded; ``KEY.0.<ext>``,
``KEY.1.<ext>``, ... for a sample with several images, none for a text-only one) and
``KEY.json``: ``{"caption": ...}``, ``{"captions": [...]}``, ``{"question": ..., "answers":
[...]}``, a conversation ``{"messages": [{"role", "content"}]}`` or an interleaved document
``{"document": "text <image> text ..."}``; in the last two, ``<image>`` marks where each image
goes, in reading order.
Every image is decoded once before it is written, with the same decoding as training, so a
shard set holds only samples a run can use; what was skipped, and why, is in the summary.

Importers (here for plain caption / COCO / VQA files, ``data.importers`` for LLaVA, VQAv2,
Karpathy, OBELICS and MMC4) yield a ``Record`` or a ``Skip`` for every input record, so the
counts add up: records read = written + skipped (by reason) + left out (not asked for). Where
a sample holds countable parts (the questions of a VQAv2 image, the images of a document), the
importer says how many and yields a ``Drop`` for each part it could not keep, so those add up
too.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from vlm.data.decode import IMAGE_EXTENSIONS, BadSample, decode_image

ImageSource = Path | bytes


@dataclass
class Record:
    """One sample to write: where its image is (a path, or bytes already in memory), or its
    images in reading order (a list; empty for a text-only sample), and its text."""

    image: ImageSource | list[ImageSource]
    text: dict[str, Any]
    name: str = ""  # where it came from, for the summary
    ext: str = ""  # image extension when an image is bytes
    parts: dict[str, int] = field(default_factory=dict)  # what it holds, e.g. {"questions": 3}

    @property
    def images(self) -> list[ImageSource]:
        return list(self.image) if isinstance(self.image, list) else [self.image]


@dataclass
class Skip:
    """A sample the writer could not use, and the parts it held (lost with it)."""

    reason: str
    name: str
    parts: dict[str, int] = field(default_factory=dict)


@dataclass
class Drop:
    """One part of a sample left out while the rest is written (a question without answers, an
    image whose file was not found); ``unit`` names the part: ``"questions"``, ``"images"``."""

    unit: str
    reason: str
    name: str


@dataclass
class LeftOut:
    """A record the user did not ask for (another split): counted apart, never a skip."""

    reason: str
    name: str


EXAMPLES = 3  # names kept per reason, for the summary


@dataclass
class PartCounts:
    """What became of one kind of part: written (in how many samples), or skipped by reason."""

    written: int = 0
    samples: int = 0  # written samples holding at least one
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    @property
    def read(self) -> int:
        return self.written + self.skipped.total()

    def skip(self, reason: str, name: str, count: int = 1) -> None:
        self.skipped[reason] += count
        _remember(self.examples[reason], name)

    def line(self, unit: str) -> str:
        """``"questions: 12 read, 9 written in 3 sample(s), 3 skipped: missing_answers 3 (e.g. ...)"``."""
        text = f"{unit}: {self.read} read, {self.written} written in {self.samples} sample(s)"
        if not self.skipped:
            return text
        reasons = ", ".join(
            f"{reason} {n} (e.g. {', '.join(self.examples[reason])})"
            for reason, n in sorted(self.skipped.items())
        )
        return f"{text}, {self.skipped.total()} skipped: {reasons}"


@dataclass
class WriteSummary:
    """What a write did with every record: written, skipped (by reason) or left out; and, per
    kind of part (``parts``), what became of each part."""

    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    left_out: Counter = field(default_factory=Counter)
    left_out_examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    parts: dict[str, PartCounts] = field(default_factory=lambda: defaultdict(PartCounts))

    @property
    def read(self) -> int:
        """Records read: written + skipped + left out."""
        return self.written + self.skipped.total() + self.left_out.total()

    def skip(self, reason: str, name: str, parts: dict[str, int] | None = None) -> None:
        self.skipped[reason] += 1
        _remember(self.examples[reason], name)
        for unit, count in (parts or {}).items():
            if count:
                self.parts[unit].skip(reason, name, count)

    def wrote(self, parts: dict[str, int]) -> None:
        self.written += 1
        for unit, count in parts.items():
            self.parts[unit].written += count
            self.parts[unit].samples += count > 0

    def leave_out(self, reason: str, name: str) -> None:
        self.left_out[reason] += 1
        _remember(self.left_out_examples[reason], name)

    def report(self) -> str:
        lines = [f"wrote {self.written} samples in {len(self.shards)} shard(s) from {self.read} records"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"skipped {count} ({reason}), e.g. {', '.join(self.examples[reason])}")
        for reason, count in sorted(self.left_out.items()):
            examples = ", ".join(self.left_out_examples[reason])
            lines.append(f"left out {count} ({reason}, not asked for), e.g. {examples}")
        lines += [self.parts[unit].line(unit) for unit in sorted(self.parts)]
        return "\n".join(lines)


def _remember(examples: list[str], name: str) -> None:
    if len(examples) < EXAMPLES:
        examples.append(name)


class _Shards:
    """Rolls over to a new tar every ``max_count`` samples or ``max_bytes`` bytes.
    Each shard is written to a temporary name and renamed when complete."""

    def __init__(self, out_dir: Path, prefix: str, max_count: int, max_bytes: int):
        self.out_dir, self.prefix = out_dir, prefix
        self.max_count, self.max_bytes = max_count, max_bytes
        self.index, self.count, self.bytes = 0, 0, 0
        self.writer: wds.TarWriter | None = None
        self.path: Path | None = None
        self.done: list[str] = []

    def write(self, sample: dict[str, Any], size: int) -> None:
        if self.writer is not None and (self.count >= self.max_count or self.bytes + size > self.max_bytes):
            self.close()
        if self.writer is None:
            self.path = self.out_dir / f"{self.prefix}-{self.index:06d}.tar"
            self.writer = wds.TarWriter(str(self.path) + ".tmp")
            self.index += 1
        self.writer.write(sample)
        self.count, self.bytes = self.count + 1, self.bytes + size

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        os.replace(str(self.path) + ".tmp", self.path)
        self.done.append(str(self.path))
        self.writer, self.count, self.bytes = None, 0, 0

    def abort(self) -> None:
        """Drops the shard being written: an interrupted shard never gets a final name."""
        if self.writer is not None:
            self.writer.close()
            os.remove(str(self.path) + ".tmp")
            self.writer = None


def write_shards(
    records: Iterable[Record | Skip | Drop | LeftOut],
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    num_shards: int | None = None,
    max_shard_bytes: int = 1 << 30,
    total: int | None = None,
    desc: str = "write",
    check_images: bool = True,
) -> WriteSummary:
    """Writes records to ``out_dir/{prefix}-000000.tar``, ``...-000001.tar``, ...

    Args:
        samples_per_shard: samples per shard (the last may hold fewer).
        num_shards: spread the samples over this many shards instead (needs ``total``).
        max_shard_bytes: start a new shard before one grows past this size.
        total: number of records (``Drop``s aside), for the progress bar and ``num_shards``.
        check_images: decode each image first and skip those training could not use.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if num_shards is not None:
        if not total:
            raise ValueError("num_shards needs the total number of records")
        samples_per_shard = math.ceil(total / num_shards)
    shards = _Shards(out_dir, prefix, samples_per_shard, max_shard_bytes)
    summary = WriteSummary()
    progress = tqdm(total=total, desc=desc, unit="record")
    try:
        for record in records:
            if isinstance(record, Drop):  # part of a sample: its record comes too
                summary.parts[record.unit].skip(record.reason, record.name)
                continue
            progress.update()
            if isinstance(record, LeftOut):
                summary.leave_out(record.reason, record.name)
                continue
            if isinstance(record, Skip):
                summary.skip(record.reason, record.name, record.parts)
                continue
            try:
                images = [_image_bytes(image, record.ext) for image in record.images]
                if check_images:
                    for data, _ in images:
                        decode_image(data)
            except BadSample as bad:
                summary.skip(bad.reason, record.name, record.parts)
                continue
            text = json.dumps(record.text, ensure_ascii=False).encode()
            sample = {"__key__": f"{summary.written:09d}", "json": text}
            if len(images) == 1:
                sample[images[0][1]] = images[0][0]
            else:  # KEY.0.jpg, KEY.1.png, ...: read back in this order
                sample.update((f"{i}.{ext}", data) for i, (data, ext) in enumerate(images))
            shards.write(sample, sum(len(data) for data, _ in images) + len(text))
            summary.wrote(record.parts)
    except BaseException:
        shards.abort()
        raise
    finally:
        progress.close()
    shards.close()
    summary.shards = shards.done
    return summary


def _image_bytes(image: ImageSource, ext: str) -> tuple[bytes, str]:
    if isinstance(image, bytes):
        return image, ext or "png"
    path = image
    if not path.is_file():
        raise BadSample("missing_image")
    ext = path.suffix.lower().lstrip(".")
    return path.read_bytes(), (ext if ext in IMAGE_EXTENSIONS else "img")


def _caption_text(row: dict[str, Any]) -> dict[str, Any] | None:
    captions = row.get("captions") or ([row["caption"]] if row.get("caption") else [])
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        return None
    return {"caption": captions[0]} if len(captions) == 1 else {"captions": captions}


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL, CSV or JSON-list file."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f)
    elif path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    else:
        yield from json.loads(path.read_text(encoding="utf-8"))


def from_image_folder(images: str | Path, captions: str | Path) -> Iterator[Record | Skip]:
    """Records from an image folder and a JSONL / CSV / JSON list of ``{"image", "caption"}``
    rows (``"captions"``: a list also works); image paths are relative to ``images``."""
    images = Path(images)
    for i, row in enumerate(read_rows(Path(captions))):
        name = str(row.get("image") or f"row {i}")
        text = _caption_text(row)
        if not row.get("image"):
            yield Skip("missing_image", name)
        elif text is None:
            yield Skip("missing_text", name)
        else:
            yield Record(images / row["image"], text, name)


def from_coco_captions(annotations: str | Path, images: str | Path) -> Iterator[Record | Skip]:
    """Records from a COCO captions file (``images`` + ``annotations``): one per image, all its captions."""
    data = json.loads(Path(annotations).read_text(encoding="utf-8"))
    captions: dict[int, list[str]] = defaultdict(list)
    for ann in data.get("annotations", []):
        captions[ann["image_id"]].append(ann["caption"])
    for image in data.get("images", []):
        text = _caption_text({"captions": captions.get(image["id"], [])})
        if text is None:
            yield Skip("missing_text", image["file_name"])
        else:
            text["image_id"] = image["id"]
            yield Record(Path(images) / image["file_name"], text, image["file_name"])


def from_vqa(questions: str | Path, images: str | Path) -> Iterator[Record | Skip]:
    """Records from a VQA file: a JSON list or JSONL of ``{"image", "question", "answers"}``
    (``"answer"``: a single string also works)."""
    for i, row in enumerate(read_rows(Path(questions))):
        name = str(row.get("image") or f"row {i}")
        answers = row.get("answers") or ([row["answer"]] if row.get("answer") else [])
        answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
        question = (row.get("question") or "").strip()
        if not row.get("image"):
            yield Skip("missing_image", name)
        elif not question or not answers:
            yield Skip("missing_text", name)
        else:
            yield Record(Path(images) / row["image"], {"question": question, "answers": answers}, name)


def encode_png(image) -> bytes:
    """PNG bytes of a PIL image (for records generated in memory)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
