"""The synthetic shapes dataset: flat coloured shapes on a plain background, with captions and QA.

Each image holds 1-3 shapes, one per column (left / center / right), never two identical
(colour, shape) pairs. The text is templated and fully determined by the objects, so a tiny model
can learn it in minutes. A few colour-shape pairs (``HELD_OUT``) never occur in the train split
but do occur in val and test, to measure compositional generalisation.

Beside the caption / QA shards, the set holds the two other kinds of data the model families
train on, each in the form people bring it:

- LLaVA JSON files and an image folder: captions for pretraining (``plain``) and multi-turn
  conversations whose later turns refer back to an earlier answer ("what is on the left?",
  then "what color is it?"). They are turned into shards by the LLaVA importer, as a user's
  files would be.
- Interleaved few-shot documents: single-shape images, each followed by its answer for one
  attribute (colour, shape or column) that the document never names; only the examples
  before a query tell which attribute is asked.

Every sample is a pure function of ``(seed, split, index)``: ``generate`` can rebuild any sample
of any split without generating the ones before it.

Text pre-tokenization: lowercase words and digits, plus ``,`` ``:`` ``?`` as separate tokens;
words are separated by single spaces and punctuation attaches to the word before it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlm.data.importers import from_llava
from vlm.data.writers import Record, encode_png, write_shards
from vlm.processor import IMAGE_TOKEN
from vlm.tiling.split import marker_tokens

#: ``(width, height)`` of a high-resolution image, in pixels.
Canvas = tuple[int, int]

#: Bump when the images or texts change, so ``write_shapes`` rebuilds existing shard sets.
VERSION = 3  # 3: the tokenizer holds split tiling's image markers

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 0),
    "purple": (140, 40, 180),
    "orange": (250, 110, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLUMNS: tuple[str, ...] = ("left", "center", "right")
BACKGROUND = (240, 240, 235)

#: Never in train, present in val and test; each colour and each shape occurs at most once here.
HELD_OUT: tuple[tuple[str, str], ...] = (("blue", "triangle"), ("yellow", "circle"), ("purple", "square"))

SPLITS = ("train", "val", "test")
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<image>"]

#: The conversations' later turns: each asks about the object an earlier turn was about.
FOLLOW_UPS = {"color": "what color is it?", "shape": "what shape is it?", "column": "where is it?"}
#: The first human turn of the pretraining captions (LLaVA-Pretrain's vary; ``plain`` drops them).
PRETRAIN_PROMPT = "describe the image briefly"
#: The attributes a few-shot document may be about, and its number of (image, answer) items.
ATTRIBUTES = ("color", "shape", "column")
DOCUMENT_ITEMS = 5
#: The tokenizer's chat template, in words of its own vocabulary (``user: ... assistant: ...``).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# How a column is named inside a sentence ("a red circle on the left", "what is in the center?").
_WHERE = {"left": "on the left", "center": "in the center", "right": "on the right"}
_TOKEN = re.compile(r"[a-z0-9]+|[,:?]")


@dataclass
class ShapeSample:
    """One generated sample.

    ``objects`` are sorted left to right; each is ``{"color", "shape", "column", "box"}`` where
    ``box`` is ``[x0, y0, x1, y1]`` in pixels (x1, y1 exclusive).
    """

    image: Image.Image
    objects: list[dict[str, Any]]
    captions: list[str]
    qa: list[dict[str, str]]

    @property
    def text(self) -> dict[str, Any]:
        """The JSON written next to the image in a shard."""
        return {"captions": self.captions, "qa": self.qa, "objects": self.objects}


def _name(obj: dict[str, Any]) -> str:
    return f"{obj['color']} {obj['shape']}"


def _a(obj: dict[str, Any]) -> str:
    """The object with its article: 'a red circle', 'an orange square'."""
    article = "an" if obj["color"][0] in "aeiou" else "a"
    return f"{article} {_name(obj)}"


def _join(phrases: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions_for(objects: list[dict[str, Any]]) -> list[str]:
    """Three captions for objects sorted left to right; the first is the canonical template.

    Objects are named "a <color> <shape>" ("an orange ..."); three are joined "x, y and z".

    Args:
        objects: dicts with ``color``, ``shape`` and ``column``, sorted left to right.

    Returns:
        ``["a red circle on the left and a blue square on the right",
        "there are 2 shapes: a red circle and a blue square",
        "a red circle to the left of a blue square"]``, or for one object
        ``["a green triangle in the center", "there is 1 shape: a green triangle",
        "a single green triangle in the center"]``.
    """
    names = [_a(o) for o in objects]
    canonical = _join([f"{n} {_WHERE[o['column']]}" for n, o in zip(names, objects)])
    if len(objects) == 1:
        count = f"there is 1 shape: {names[0]}"
        relation = f"a single {_name(objects[0])} {_WHERE[objects[0]['column']]}"
    else:
        count = f"there are {len(objects)} shapes: {_join(names)}"
        if len(objects) == 2:
            relation = f"{names[0]} to the left of {names[1]}"
        else:  # three objects fill the three columns, so the second is in the middle
            relation = f"{names[1]} between {names[0]} and {names[2]}"
    return [canonical, count, relation]


def qa_for(objects: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Question-answer pairs about objects sorted left to right.

    Questions: ``how many shapes are there?``; per object ``what color is the <shape>?`` (only if
    that shape is unique in the image), ``what shape is the <color> object?`` (only if that
    colour is unique), ``where is the <color> <shape>?``; then ``what is on the left?`` /
    ``what is in the center?`` / ``what is on the right?`` for occupied columns.

    Args:
        objects: dicts with ``color``, ``shape`` and ``column``, sorted left to right.
    """
    shape_counts = Counter(o["shape"] for o in objects)
    color_counts = Counter(o["color"] for o in objects)
    pairs = [("how many shapes are there?", str(len(objects)))]
    for o in objects:
        if shape_counts[o["shape"]] == 1:
            pairs.append((f"what color is the {o['shape']}?", o["color"]))
        if color_counts[o["color"]] == 1:
            pairs.append((f"what shape is the {o['color']} object?", o["shape"]))
        pairs.append((f"where is the {_name(o)}?", o["column"]))
    for o in objects:
        pairs.append((f"what is {_WHERE[o['column']]}?", _name(o)))
    return [{"question": q, "answer": a} for q, a in pairs]


def _openers(target: dict[str, Any], objects: list[dict[str, Any]]) -> list[tuple[str, str, set[str]]]:
    """Questions that single out ``target``: (question, answer, the attributes they state)."""
    unique_shape = sum(o["shape"] == target["shape"] for o in objects) == 1
    unique_color = sum(o["color"] == target["color"] for o in objects) == 1
    shape, color, column = target["shape"], target["color"], target["column"]
    openers = [(f"what is {_WHERE[column]}?", _name(target), {"column"})]  # "it" may ask for more
    if unique_shape:
        openers += [
            (f"where is the {shape}?", column, {"shape", "column"}),
            (f"what color is the {shape}?", color, {"shape", "color"}),
        ]
    if unique_color:
        openers += [
            (f"where is the {color} object?", column, {"color", "column"}),
            (f"what shape is the {color} object?", shape, {"color", "shape"}),
        ]
    return openers


def conversation_for(objects: list[dict[str, Any]], rng: random.Random) -> list[dict[str, str]]:
    """A chat (role/content messages, the image at the start of the first user turn) about one
    or two of the objects: for each, a question that singles it out, then follow-ups about
    ``it`` whose answers depend on which object the question before was about.

    Returns e.g. ``[user "<image>\\nwhere is the circle?", assistant "left", user "what color
    is it?", assistant "red"]``.
    """
    messages: list[dict[str, str]] = []
    for target in rng.sample(objects, min(len(objects), rng.randint(1, 2))):
        question, answer, stated = rng.choice(_openers(target, objects))
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        follow_ups = [a for a in FOLLOW_UPS if a not in stated]
        rng.shuffle(follow_ups)
        for attribute in follow_ups[: rng.randint(1, len(follow_ups))]:
            messages += [
                {"role": "user", "content": FOLLOW_UPS[attribute]},
                {"role": "assistant", "content": target[attribute]},
            ]
    messages[0]["content"] = f"{IMAGE_TOKEN}\n{messages[0]['content']}"
    return messages


def words(text: str) -> list[str]:
    """The pre-tokenization the tokenizer uses: words, digits and ``,`` ``:`` ``?``."""
    return _TOKEN.findall(text)


def _all_texts(objects: list[dict[str, Any]]) -> list[str]:
    qa = qa_for(objects)
    openers = [f"where is the {o['shape']}? where is the {o['color']} object?" for o in objects]
    texts = captions_for(objects) + [p["question"] for p in qa] + [p["answer"] for p in qa] + openers
    return texts + list(FOLLOW_UPS.values()) + [PRETRAIN_PROMPT, "user: assistant:"]


def vocabulary() -> list[str]:
    """Every token that can appear in a caption, question or answer, sorted.

    Found by writing the text of every possible object layout (a few thousand), so it can never
    miss a word the templates use.
    """
    return list(_vocabulary())


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    combos = [(c, s) for c in COLORS for s in SHAPES]
    vocab: set[str] = set()
    for n in (1, 2, 3):
        for columns in itertools.combinations(COLUMNS, n):
            for picked in itertools.permutations(combos, n):
                objects = [{"color": c, "shape": s, "column": col} for (c, s), col in zip(picked, columns)]
                for text in _all_texts(objects):
                    vocab.update(words(text))
    return tuple(sorted(vocab))


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level ``transformers`` tokenizer over ``vocabulary()`` plus the special tokens.

    Ids 0-4 are ``<pad> <bos> <eos> <unk> <image>``; split tiling's image markers (up to 4 x 4
    tiles) follow the words. Encoding adds no special tokens (the
    training pipeline places ``<bos>`` / ``<eos>`` itself); ``decode(ids, skip_special_tokens=True)``
    gives back the original text. Its chat template (``CHAT_TEMPLATE``) renders conversations
    as ``user: ... assistant: ...<eos>``.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    # The WordPiece decoder (with a prefix no token has) puts a space before every token but the
    # first; the replacements then re-attach punctuation to the word before it.
    backend.decoder = decoders.Sequence(
        [decoders.WordPiece(prefix="##", cleanup=False)]
        + [decoders.Replace(f" {mark}", mark) for mark in ",:?"]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<image>", *marker_tokens(4)],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def combination(text: dict[str, Any]) -> str:
    """Evaluation group of a sample's text: whether it shows a held-out colour-shape pair."""
    pairs = {(o["color"], o["shape"]) for o in text.get("objects", [])}
    return "held-out combination" if pairs & set(HELD_OUT) else "seen combinations"


def _allowed_combos(split: str) -> list[tuple[str, str]]:
    combos = [(c, s) for c in COLORS for s in SHAPES]
    return [pair for pair in combos if pair not in HELD_OUT] if split == "train" else combos


def _box(rng: random.Random, column: int, image_size: int, canvas: Canvas | None = None) -> list[int]:
    """A square box inside ``column`` with a 1-pixel margin, so shapes in different columns never
    touch; size and position jitter a little around the column centre. On a ``canvas`` (width,
    height) the columns are the canvas's thirds and the box keeps the size it has at
    ``image_size``: small objects on a large image."""
    width_px, height_px = canvas or (image_size, image_size)
    left, right = round(column * width_px / 3), round((column + 1) * width_px / 3)
    width = right - left
    scale = width if canvas is None else image_size / 3
    size = max(3, round(scale * rng.uniform(0.55, 0.8)))
    slack_x = width - size - 2
    x0 = left + 1 + round(slack_x / 2 * (1 + 0.6 * rng.uniform(-1, 1)))
    slack_y = height_px - size - 2
    y0 = 1 + round(slack_y / 2 * (1 + 0.5 * rng.uniform(-1, 1)))
    return [x0, y0, x0 + size, y0 + size]


def render(objects: list[dict[str, Any]], image_size: int, canvas: Canvas | None = None) -> Image.Image:
    """Draws the objects (with their ``box``) as flat, non-antialiased shapes on the background.

    Args:
        objects: dicts with ``color``, ``shape`` and ``box``.
        image_size: width and height of the image in pixels.
        canvas: ``(width, height)`` instead.
    """
    image = Image.new("RGB", canvas or (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:  # an upward triangle filling the box
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    return image


def generate(
    split: str, index: int, *, seed: int = 0, image_size: int = 64, canvas: Canvas | None = None
) -> ShapeSample:
    """The sample ``index`` of ``split``; depends only on ``(seed, split, index)``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (train never shows a ``HELD_OUT`` pair).
        index: sample number within the split.
        seed: dataset seed.
        image_size: image width and height in pixels (at least 24).
        canvas: ``(width, height)``: a larger image, its objects the size they have at
            ``image_size`` (the same objects, columns and texts as without it).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_sizes(image_size, canvas)
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and processes.
    rng = random.Random(f"{seed}:{split}:{index}")
    n = rng.randint(1, 3)
    columns = sorted(rng.sample(range(3), n))
    pairs = rng.sample(_allowed_combos(split), n)  # distinct pairs: no two identical objects
    objects = [
        {"color": c, "shape": s, "column": COLUMNS[col], "box": _box(rng, col, image_size, canvas)}
        for (c, s), col in zip(pairs, columns)
    ]
    image = render(objects, image_size, canvas)
    return ShapeSample(image, objects, captions_for(objects), qa_for(objects))


def _check_sizes(image_size: int, canvas: Canvas | None) -> None:
    if image_size < 24:
        raise ValueError(f"image_size must be at least 24, got {image_size}")
    # The objects keep their size at image_size: a third of its width, at most, plus margins.
    if canvas is not None and (len(canvas) != 2 or canvas[0] < image_size or canvas[1] < image_size // 2):
        raise ValueError(
            f"canvas must be (width, height), width at least {image_size} and height at least "
            f"{image_size // 2}, got {canvas}"
        )


@dataclass
class FewShotDocument:
    """Single-shape images, each with its answer for ``attribute`` (never written in the text)."""

    images: list[Image.Image]
    answers: list[str]
    attribute: str

    @property
    def text(self) -> dict[str, Any]:
        document = "".join(f"{IMAGE_TOKEN}{answer}" for answer in self.answers)
        return {"document": document, "attribute": self.attribute, "answers": self.answers}


def fewshot_document(
    split: str, index: int, *, seed: int = 0, image_size: int = 64, canvas: Canvas | None = None
) -> FewShotDocument:
    """The few-shot document ``index`` of ``split``; a pure function of its arguments, like
    :func:`generate` (train documents never show a ``HELD_OUT`` pair either)."""
    rng = random.Random(f"{seed}:{split}:document:{index}")
    attribute = rng.choice(ATTRIBUTES)
    images, answers = [], []
    for _ in range(DOCUMENT_ITEMS):
        column = rng.randrange(3)
        color, shape = rng.choice(_allowed_combos(split))
        obj = {
            "color": color,
            "shape": shape,
            "column": COLUMNS[column],
            "box": _box(rng, column, image_size, canvas),
        }
        images.append(render([obj], image_size, canvas))
        answers.append(obj[attribute])
    return FewShotDocument(images, answers, attribute)


def _records(split: str, count: int, seed: int, image_size: int, canvas: Canvas | None):
    for index in range(count):
        sample = generate(split, index, seed=seed, image_size=image_size, canvas=canvas)
        yield Record(image=encode_png(sample.image), text=sample.text, name=f"{split}/{index}", ext="png")


def _document_records(split: str, count: int, seed: int, image_size: int, canvas: Canvas | None):
    for index in range(count):
        document = fewshot_document(split, index, seed=seed, image_size=image_size, canvas=canvas)
        images = [encode_png(image) for image in document.images]
        yield Record(image=images, text=document.text, name=f"documents/{split}/{index}", ext="png")


def _llava_rows(
    split: str, count: int, seed: int, image_size: int, canvas: Canvas | None, images: Path
) -> tuple[list, list]:
    """Writes ``count`` images of ``split`` into ``images`` and returns the LLaVA-Pretrain style
    caption records and the LLaVA-Instruct style conversation records about them."""
    (images / split).mkdir(parents=True, exist_ok=True)
    pretrain, instruct = [], []
    for index in range(count):
        sample = generate(split, index, seed=seed, image_size=image_size, canvas=canvas)
        name = f"{split}/{index:06d}.png"
        sample.image.save(images / name)
        rng = random.Random(f"{seed}:{split}:chat:{index}")
        chat = conversation_for(sample.objects, rng)
        turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in chat]
        instruct.append({"id": f"{split}-{index:06d}", "image": name, "conversations": turns})
        caption = [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{PRETRAIN_PROMPT}"},
            {"from": "gpt", "value": sample.captions[0]},
        ]
        pretrain.append({"id": f"{split}-{index:06d}", "image": name, "conversations": caption})
    return pretrain, instruct


def _arguments(
    seed: int, sizes: dict[str, Any], image_size: int, canvas: Canvas | None, samples_per_shard: int
) -> dict[str, Any]:
    return {
        "version": VERSION,
        "seed": seed,
        "sizes": sizes,
        "image_size": image_size,
        "canvas": None if canvas is None else list(canvas),
        "samples_per_shard": samples_per_shard,
    }


def _existing(manifest_path: Path, arguments: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest on disk if it was written with the same arguments and its shards exist."""
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if any(manifest.get(key) != value for key, value in arguments.items()):
        return None
    out_dir = manifest_path.parent
    files = [out_dir / s for shards in manifest.get("shards", {}).values() for s in shards]
    files += [out_dir / f for f in manifest.get("llava", {}).values()]
    files.append(out_dir / manifest.get("tokenizer", "tokenizer") / "tokenizer.json")
    return manifest if all(f.is_file() for f in files) else None


def _write_set(
    records, out_dir: Path, set_dir: str, prefix: str, total: int, samples_per_shard: int
) -> list[str]:
    """Writes one shard set (replacing any older one there) and returns its shard paths,
    relative to ``out_dir``."""
    folder = out_dir / set_dir
    for old in folder.glob(f"{prefix}-*.tar*"):  # another configuration's shards, or a glob finds them
        old.unlink()
    summary = write_shards(
        records,
        folder,
        prefix=prefix,
        samples_per_shard=samples_per_shard,
        total=total,
        desc=f"shapes {set_dir}",
        check_images=False,  # generated just now: nothing to check
    )
    if summary.written != total:  # generated data is all good; anything else is a bug here
        raise RuntimeError(f"{set_dir}: wrote {summary.written} of {total}\n{summary.report()}")
    return [Path(s).relative_to(out_dir).as_posix() for s in summary.shards]


def write_shapes(
    out_dir: str | Path,
    *,
    seed: int = 0,
    train: int = 20000,
    val: int = 500,
    test: int = 500,
    conversations: int | None = None,
    documents: int | None = None,
    image_size: int = 64,
    canvas: Canvas | None = None,
    samples_per_shard: int = 500,
) -> dict[str, Any]:
    """Writes the shard sets, the LLaVA files, the tokenizer and ``shapes.json``; a no-op if
    they already exist.

    Layout under ``out_dir``:

    - ``{train,val,test}/shapes-<split>-000000.tar ...``: images with captions and QA;
    - ``llava/images/<split>/<index>.png``, ``llava/pretrain.json`` (captions, train split) and
      ``llava/instruct-{train,test}.json`` (conversations): LLaVA's JSON schema;
    - ``pretrain/`` and ``conversations/{train,test}/``: those files through the LLaVA importer;
    - ``documents/{train,test}/``: interleaved few-shot documents;
    - ``tokenizer/`` and ``shapes.json`` (the manifest; written last, so its presence means
      complete).

    Args:
        out_dir: where to write.
        seed: dataset seed.
        train, val, test: number of caption / QA samples per split.
        conversations, documents: train conversations and few-shot documents (default: a
            third and a fifth of ``train``); their test sets hold ``test`` each.
        image_size: image width and height in pixels.
        canvas: ``(width, height)``: every image that large, its objects as small as at
            ``image_size`` (the high-resolution variant: what one downscaled view cannot resolve).
        samples_per_shard: samples per tar shard (small shards interleave the kinds of data
            when their shards are shuffled together).

    Returns:
        The manifest: the arguments, colours, shapes, held-out pairs, vocabulary size, and per
        shard set its sample count and shard paths (relative to ``out_dir``).
    """
    out_dir = Path(out_dir)
    conversations = train // 3 if conversations is None else conversations
    documents = train // 5 if documents is None else documents
    sizes = {
        "train": train,
        "val": val,
        "test": test,
        "conversations": {"train": conversations, "test": test},
        "documents": {"train": documents, "test": test},
    }
    canvas = tuple(canvas) if canvas else None  # a TOML / JSON list
    _check_sizes(image_size, canvas)
    arguments = _arguments(seed, sizes, image_size, canvas, samples_per_shard)
    manifest_path = out_dir / "shapes.json"
    existing = _existing(manifest_path, arguments)
    if existing is not None:
        return existing
    # Shards are about to change: no manifest may vouch for them until all are rewritten.
    manifest_path.unlink(missing_ok=True)

    counts, shards = {}, {}
    for split in SPLITS:
        count = sizes[split]
        shards[split] = _write_set(
            _records(split, count, seed, image_size, canvas),
            out_dir,
            split,
            f"shapes-{split}",
            count,
            samples_per_shard,
        )
        counts[split] = count
    for split, count in sizes["documents"].items():
        records = _document_records(split, count, seed, image_size, canvas)
        shards[f"documents/{split}"] = _write_set(
            records, out_dir, f"documents/{split}", f"documents-{split}", count, samples_per_shard
        )
        counts[f"documents/{split}"] = count

    # The LLaVA files, then shards from them through the importer a user's files go through.
    images = out_dir / "llava" / "images"
    llava = {}
    for split, count in sizes["conversations"].items():
        pretrain, instruct = _llava_rows(split, count, seed, image_size, canvas, images)
        files = {"instruct": instruct} | ({"pretrain": pretrain} if split == "train" else {})
        for kind, rows in files.items():
            name = f"llava/{kind}.json" if kind == "pretrain" else f"llava/{kind}-{split}.json"
            (out_dir / name).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
            llava[name.removeprefix("llava/").removesuffix(".json")] = name
            set_dir = "pretrain" if kind == "pretrain" else f"conversations/{split}"
            shards[set_dir] = _write_set(
                from_llava(out_dir / name, images),
                out_dir,
                set_dir,
                set_dir.replace("/", "-"),
                count,
                samples_per_shard,
            )
            counts[set_dir] = count
    tokenizer().save_pretrained(str(out_dir / "tokenizer"))

    manifest = {
        **arguments,
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "shapes": list(SHAPES),
        "held_out": [list(pair) for pair in HELD_OUT],
        "vocab_size": len(tokenizer()),
        "counts": counts,
        "shards": shards,
        "llava": llava,
        "tokenizer": "tokenizer",
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    return manifest


def main(argv: list[str] | None = None) -> None:
    """``python -m vlm.data.shapes OUT_DIR [--train N ...]``: writes the dataset and times it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--canvas", type=int, nargs=2, default=None)
    parser.add_argument("--conversations", type=int, default=None)
    parser.add_argument("--documents", type=int, default=None)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    options = vars(parser.parse_args(argv))  # the other dests are write_shapes' keywords
    out_dir = options.pop("out_dir")
    start = time.perf_counter()
    manifest = write_shapes(out_dir, **options)
    print(f"{manifest['counts']} in {time.perf_counter() - start:.1f}s -> {out_dir}")


if __name__ == "__main__":
    main()
