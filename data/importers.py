"""Importers: the dataset files people bring, as records for :func:`write_shards`.

- LLaVA JSON (LLaVA-Pretrain, LLaVA-Instruct mix665k, ShareGPT4V): conversations;
- VQAv2 (the official questions + annotations pair): one sample per image, all its questions;
- the COCO Karpathy split (``dataset_coco.json``): captions, one or more splits;
- OBELICS and MMC4: interleaved documents, their images resolved through img2dataset's
  output (``--url-map``) or by file name.

Every input record becomes a ``Record`` or a ``Skip`` with a reason (or a ``LeftOut`` when it
belongs to a split not asked for); a question or an image that cannot be kept while the rest of
its sample is written becomes a ``Drop``. So the summary adds up: records read = written +
skipped + left out, and the same for questions and for images.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow.parquet as pq

from vlm.data.decode import IMAGE_EXTENSIONS
from vlm.data.samples import check_messages, placed_images
from vlm.data.writers import Drop, LeftOut, Record, Skip, read_rows
from vlm.processor import IMAGE_TOKEN

Item = Record | Skip | Drop | LeftOut

#: LLaVA's ``from`` -> the ``role`` of ``data.samples``.
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

#: The splits of the Karpathy files.
KARPATHY_SPLITS = ("train", "val", "test", "restval")

#: How the texts of an OBELICS document, and its images' markers, are joined: paragraphs stay
#: apart, and each image stands alone between the paragraphs around it.
OBELICS_JOIN = "\n\n"
#: How the sentences of an MMC4 document (and the markers before them) are joined.
MMC4_JOIN = " "


# ---------------------------------------------------------------------------------------------
# Reading tables and finding files


def table_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a parquet, JSONL (also zipped: ``.jsonl.zip``, as MMC4 ships), CSV or JSON-list file."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".parquet"):
        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    elif name.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            for member in sorted(archive.namelist()):
                for line in archive.read(member).decode("utf-8").splitlines():
                    if line.strip():
                        yield json.loads(line)
    else:
        yield from read_rows(path)


def _is_url(ref: str) -> bool:
    parts = urlsplit(ref)
    return bool(parts.scheme and parts.netloc)


class ImageFiles:
    """The image files under a folder, found by file name, by stem or by the number their
    stem ends in. The folder is walked once, when first needed. A lookup that matches several
    files finds none: a wrong image is worse than a missing one."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._index: dict[str, dict[Any, list[Path]]] | None = None

    def _build(self) -> dict[str, dict[Any, list[Path]]]:
        index: dict[str, dict[Any, list[Path]]] = {"name": defaultdict(list), "stem": defaultdict(list)}
        index["number"] = defaultdict(list)
        for path in sorted(self.root.rglob("*")):
            if path.suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS or not path.is_file():
                continue
            index["name"][path.name].append(path)
            index["stem"][path.stem].append(path)
            digits = re.search(r"\d+$", path.stem)
            # "391895.jpg", or "COCO_val2014_000000391895.jpg": a name ending in a 12-digit id
            if digits and (digits.group() == path.stem or len(digits.group()) >= 12):
                index["number"][int(digits.group()[-12:])].append(path)
        return index

    def find(self, kind: str, value: Any) -> Path | None:
        """The one file whose ``kind`` (``"name"``, ``"stem"`` or ``"number"``) is ``value``."""
        if self._index is None:
            self._index = self._build()
        found = self._index[kind].get(value, [])
        return found[0] if len(found) == 1 else None


def load_url_map(path: str | Path) -> dict[str, tuple[str, str]]:
    """``url -> ("key", key)`` or ``("path", relative path)`` from a table with a ``url``
    column and a ``key`` (img2dataset's parquet, written beside its output) or a ``path`` /
    ``file`` column. A directory stands for every ``*.parquet`` in it; rows whose ``status``
    is not ``success`` (failed downloads) are left out."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no *.parquet table in {path}")
    mapping: dict[str, tuple[str, str]] = {}
    for file in files:
        for row in table_rows(file):
            if not row.get("url") or row.get("status", "success") != "success":
                continue
            target = row.get("path") or row.get("file")
            if target:
                mapping[row["url"]] = ("path", str(target))
            elif row.get("key") is not None:
                mapping[row["url"]] = ("key", str(row["key"]))
            else:
                raise ValueError(f"{file}: the url map needs a 'key' or a 'path' column beside 'url'")
    return mapping


class ImageResolver:
    """The file of an image a document names: a path relative to the image folder, or a URL,
    through the url map (its ``key``: the file ``{key}.<ext>`` anywhere under the folder, as
    img2dataset lays them out; or its ``path``) or, without a map, by the URL's file name
    (directly in the folder, else the one file of that name under it)."""

    def __init__(self, root: str | Path, url_map: str | Path | None = None):
        self.root = Path(root)
        self.files = ImageFiles(root)
        self.by_url = load_url_map(url_map) if url_map else None

    def find(self, ref: Any) -> Path | None:
        if not isinstance(ref, str) or not ref:
            return None
        if not _is_url(ref):
            return self._at(ref)
        if self.by_url is not None:
            kind, target = self.by_url.get(ref, ("", ""))
            if kind == "key":
                return self.files.find("stem", target)
            return self._at(target) if kind == "path" else None
        name = unquote(PurePosixPath(urlsplit(ref).path).name)
        return (self._at(name) or self.files.find("name", name)) if name else None

    def _at(self, relative: str) -> Path | None:
        path = self.root / relative
        return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# LLaVA conversations


def from_llava(path: str | Path, images: str | Path) -> Iterator[Item]:
    """Records from a LLaVA JSON list of ``{"id", "image", "conversations": [{"from", "value"}]}``:
    ``{"messages": [{"role", "content"}], "id"}`` with the images (paths relative to ``images``;
    ``image`` may be a list; without one, a text-only conversation).

    ``<image>`` stays where it stands; a record with images but no marker gets one
    ``"<image>\\n"`` per image at the start of its first human turn, as LLaVA's training does.
    Skips: ``bad_record``, ``bad_conversation``, ``image_count`` (markers and images differ);
    the writer adds ``missing_image`` and decode reasons.
    """
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a LLaVA file is a JSON list of records")
    for i, row in enumerate(rows):
        yield _llava_record(row, Path(images), i)


def _llava_record(row: Any, images: Path, index: int) -> Record | Skip:
    if not isinstance(row, dict):
        return Skip("bad_record", f"row {index}")
    name = str(row.get("id", f"row {index}"))
    files = row.get("image")
    files = [] if files is None else [files] if isinstance(files, str) else files
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        return Skip("bad_record", f"{name} (image is not a path or a list of paths)")
    messages, why = _llava_messages(row.get("conversations"))
    if messages is None:
        return Skip("bad_conversation", f"{name} ({why})")
    if files and not placed_images({"messages": messages}):
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            return Skip("bad_conversation", f"{name} (no human turn to hold the image)")
        first["content"] = f"{IMAGE_TOKEN}\n" * len(files) + first["content"]
    markers = placed_images({"messages": messages})
    if markers != len(files):
        return Skip("image_count", f"{name} ({markers} {IMAGE_TOKEN} for {len(files)} image(s))")
    text = {"messages": messages} | ({"id": row["id"]} if "id" in row else {})
    return Record([images / f for f in files], text, name)


def _llava_messages(turns: Any) -> tuple[list[dict[str, str]] | None, str]:
    """The turns as ``data.samples`` messages, or ``None`` and why they cannot be."""
    if not isinstance(turns, list):
        return None, "conversations is not a list"
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES:
            sender = turn.get("from") if isinstance(turn, dict) else turn
            return None, f"turn {i} is from {sender!r}; known: {', '.join(LLAVA_ROLES)}"
        messages.append({"role": LLAVA_ROLES[turn["from"]], "content": turn.get("value")})
    why = check_messages(messages)
    return (None, why) if why else (messages, "")


# ---------------------------------------------------------------------------------------------
# VQAv2


def from_vqav2(questions: str | Path, annotations: str | Path, images: str | Path) -> Iterator[Item]:
    """Records from the official VQAv2 pair (the two files in either order): one per image,
    ``{"qa": [{"question", "answers" (the 10 human answers), "question_id"}], "image_id"}``.

    Each record's ``parts`` counts its questions, so the summary adds them up: a question
    without an annotation is dropped (``missing_answers``), and the questions of an image that
    is not found go with it (``missing_image``). Images: ``COCO_{subtype}_{id:012d}.jpg``
    (subtype from ``data_subtype`` or the file name, e.g. ``val2014``) in ``images`` or in
    ``images/{subtype}``; else the one image file whose stem is the id or ends in its 12 digits.
    """
    loaded = {Path(p): json.loads(Path(p).read_text(encoding="utf-8")) for p in (questions, annotations)}
    (question_data, question_path), (annotation_data, _) = (
        _holding(loaded, key) for key in ("questions", "annotations")
    )
    answers = {
        a["question_id"]: [x["answer"] for x in a.get("answers", [])] for a in annotation_data["annotations"]
    }
    subtype = question_data.get("data_subtype") or _subtype(question_path.name)
    by_image: dict[int, list[dict]] = defaultdict(list)
    for question in question_data["questions"]:
        by_image[question["image_id"]].append(question)
    finder = _CocoImages(Path(images), subtype)
    for image_id, asked in by_image.items():
        yield from _vqav2_image(image_id, asked, answers, finder)


def _holding(loaded: dict[Path, Any], key: str) -> tuple[dict, Path]:
    """The one loaded file with a ``key`` list (``questions`` or ``annotations``), and its path."""
    found = [(data, path) for path, data in loaded.items() if isinstance(data, dict) and key in data]
    if len(found) != 1:
        names = ", ".join(path.name for path in loaded)
        raise ValueError(
            f"--vqav2 takes a questions file (with 'questions') and an annotations file (with "
            f"'annotations'); {len(found)} of {names} hold '{key}'"
        )
    return found[0]


def _vqav2_image(image_id: int, asked: list[dict], answers: dict, finder: _CocoImages) -> Iterator[Item]:
    name = f"image_id {image_id}"
    qa = [
        {"question": q["question"], "answers": answers[q["question_id"]], "question_id": q["question_id"]}
        for q in asked
        if answers.get(q["question_id"])
    ]
    if not qa:
        yield Skip("missing_answers", name, {"questions": len(asked)})
        return
    for q in asked:
        if not answers.get(q["question_id"]):
            yield Drop("questions", "missing_answers", f"question_id {q['question_id']}")
    path = finder.find(image_id)
    if path is None:
        yield Skip("missing_image", finder.file_name(image_id) or name, {"questions": len(qa)})
    else:
        yield Record(path, {"qa": qa, "image_id": image_id}, name, parts={"questions": len(qa)})


def _subtype(file_name: str) -> str | None:
    """``val2014`` from ``v2_OpenEnded_mscoco_val2014_questions.json``."""
    found = re.search(r"(train|val|test-dev|test)(\d{4})", file_name)
    return found.group() if found else None


class _CocoImages:
    """COCO images by id: by their official name first, else by the id in any file's name."""

    def __init__(self, root: Path, subtype: str | None):
        self.root, self.subtype = root, subtype
        self.files = ImageFiles(root)

    def file_name(self, image_id: int) -> str | None:
        # test-dev questions are about test images: COCO_test2015_...
        folder = self.subtype.replace("test-dev", "test") if self.subtype else None
        return f"COCO_{folder}_{image_id:012d}.jpg" if folder else None

    def find(self, image_id: int) -> Path | None:
        name = self.file_name(image_id)
        if name:
            subfolder = name.split("_")[1]  # images/val2014/COCO_val2014_...
            for path in (self.root / name, self.root / subfolder / name):
                if path.is_file():
                    return path
        return self.files.find("number", image_id)


# ---------------------------------------------------------------------------------------------
# COCO Karpathy split


def from_karpathy(path: str | Path, images: str | Path, splits: list[str] | None = None) -> Iterator[Item]:
    """Records from a Karpathy split file (``dataset_coco.json``; Flickr's files too):
    ``{"captions": [raw sentences], "image_id": cocoid, "split"}``, the image at
    ``images/filepath/filename`` or ``images/filename``.

    Args:
        splits: the splits to write (default: all); images of the others are ``LeftOut``,
            counted apart from skips.
    """
    unknown = set(splits or ()) - set(KARPATHY_SPLITS)
    if unknown:
        raise ValueError(
            f"unknown split(s) {sorted(unknown)}; Karpathy's splits are {', '.join(KARPATHY_SPLITS)}"
        )
    root = Path(images)
    for i, image in enumerate(json.loads(Path(path).read_text(encoding="utf-8"))["images"]):
        name = image.get("filename") or f"image {i}"
        if splits and image.get("split") not in splits:
            yield LeftOut(f"split {image.get('split')}", name)
            continue
        sentences = [s.get("raw") for s in image.get("sentences", []) if isinstance(s, dict)]
        captions = [s.strip() for s in sentences if isinstance(s, str) and s.strip()]
        if not captions or not image.get("filename"):
            yield Skip("missing_text" if image.get("filename") else "missing_image", name)
            continue
        nested = root / image.get("filepath", "") / image["filename"]
        text = {
            "captions": captions,
            "image_id": image.get("cocoid", image.get("imgid")),
            "split": image.get("split"),
        }
        yield Record(nested if nested.is_file() else root / image["filename"], text, name)


# ---------------------------------------------------------------------------------------------
# Interleaved documents: OBELICS and MMC4


def from_obelics(
    path: str | Path, images: str | Path, *, url_map: str | Path | None = None
) -> Iterator[Item]:
    """Records from OBELICS documents (parquet or JSONL rows with parallel ``texts`` / ``images``
    lists, one of the two null at each place): ``{"document": ..., "url"}``, texts joined with
    :data:`OBELICS_JOIN` and ``<image>`` where each image stands.

    Images are found by :class:`ImageResolver`; one that is not is dropped from the document
    (``Drop("images", "unresolved")``). A document left without text is skipped
    (``missing_text``); one left without images is written as a text-only document.
    """
    resolver = ImageResolver(images, url_map)
    for i, row in enumerate(table_rows(path)):
        url = _document_url(row.get("general_metadata"))
        name = url or f"row {i}"
        texts, refs = row.get("texts"), row.get("images")
        if not isinstance(texts, list) or not isinstance(refs, list) or len(texts) != len(refs):
            lost = {"images": sum(r is not None for r in refs)} if isinstance(refs, list) else {}
            yield Skip("bad_record", f"{name} (texts and images must be lists of one length)", lost)
            continue
        pieces: list[tuple[str, Path | None]] = []  # (text or marker, the marker's image)
        for text, ref in zip(texts, refs):
            if ref is not None:
                found = resolver.find(ref)
                if found is None:
                    yield Drop("images", "unresolved", str(ref))
                else:
                    pieces.append((IMAGE_TOKEN, found))
            elif isinstance(text, str) and text.strip():
                pieces.append((text.strip(), None))
        yield _document(pieces, OBELICS_JOIN, name, {"url": url} if url else {})


def from_mmc4(path: str | Path, images: str | Path, *, url_map: str | Path | None = None) -> Iterator[Item]:
    """Records from MMC4 documents (JSONL, also zipped): ``{"document": ..., "url"}``, the
    ``text_list`` sentences joined with :data:`MMC4_JOIN`, each image's ``<image>`` before its
    ``matched_text_index`` sentence (several before one sentence keep their ``image_info``
    order), as open_flamingo places them.

    An image is ``images/image_name``, else found by ``raw_url`` through :class:`ImageResolver`;
    one that is not is dropped (``unresolved``; ``unmatched`` when its sentence index is out of
    range). A document left without text is skipped (``missing_text``).
    """
    resolver = ImageResolver(images, url_map)
    for i, row in enumerate(table_rows(path)):
        name = row.get("url") or f"row {i}"
        sentences, infos = row.get("text_list"), row.get("image_info") or []
        if not isinstance(sentences, list) or not isinstance(infos, list):
            lost = {"images": len(infos)} if isinstance(infos, list) else {}
            yield Skip("bad_record", f"{name} (text_list and image_info must be lists)", lost)
            continue
        before: dict[int, list[Path]] = defaultdict(list)  # sentence index -> its images, in order
        for info in infos:
            ref = info.get("raw_url") or info.get("image_name") or "?"
            index = info.get("matched_text_index")
            if not isinstance(index, int) or not 0 <= index < len(sentences):
                yield Drop("images", "unmatched", str(ref))
                continue
            found = resolver.find(info.get("image_name")) or resolver.find(info.get("raw_url"))
            if found is None:
                yield Drop("images", "unresolved", str(ref))
            else:
                before[index].append(found)
        pieces: list[tuple[str, Path | None]] = []
        for j, sentence in enumerate(sentences):
            pieces += [(IMAGE_TOKEN, image) for image in before[j]]
            if isinstance(sentence, str) and sentence.strip():
                pieces.append((sentence.strip(), None))
        yield _document(pieces, MMC4_JOIN, name, {"url": row["url"]} if row.get("url") else {})


def _document(pieces: list[tuple[str, Path | None]], join: str, name: str, extra: dict) -> Record | Skip:
    """A document record from its pieces in reading order: texts, and markers with their image."""
    files = [image for _, image in pieces if image is not None]
    parts = {"images": len(files)}
    if not any(image is None for _, image in pieces):
        return Skip("missing_text", name, parts)
    text = {"document": join.join(piece for piece, _ in pieces)} | extra
    if placed_images(text) != len(files):  # the text itself holds a literal "<image>"
        return Skip("image_count", name, parts)
    return Record(files, text, name, parts=parts)


def _document_url(general_metadata: Any) -> str | None:
    """The document's URL from OBELICS' ``general_metadata`` (a JSON string)."""
    try:
        meta = json.loads(general_metadata) if isinstance(general_metadata, str) else general_metadata
    except ValueError:
        return None
    return meta.get("url") if isinstance(meta, dict) and isinstance(meta.get("url"), str) else None
