"""Captioning, VQA, few-shot prompts and chat with a trained model: images in, texts out."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm.data.decode import IMAGE_EXTENSIONS, BadSample, DecodeStats, decode_image, upright_rgb
from vlm.data.loader import tile_pixels
from vlm.data.pipeline import ImageTextShards
from vlm.data.transforms import encoder_transform
from vlm.generate import GenerationConfig, generate
from vlm.hub import from_pretrained
from vlm.processor import IMAGE_TOKEN, Processor
from vlm.schema import ConfigError
from vlm.weights import load_tokenizer

log = logging.getLogger(__name__)


class InputError(ValueError):
    """Input the user must fix (a missing file, a file that is not an image...)."""


@dataclass
class Item:
    """One image to caption or ask about, and what is known of it."""

    name: str
    image: Image.Image
    text: dict[str, Any]


@dataclass
class Shot:
    """A support example for few-shot prompting: an image, the answer, and for VQA its question."""

    image: Image.Image
    answer: str
    question: str | None = None


class ReplyText:
    """A reply's text as it grows, token by token. The whole reply is decoded at each token
    (pieces such as a character's bytes only make sense together) and cut before the first
    ``stop`` string. :meth:`delta` streams it so that the pieces join into the final (stripped)
    text: a tail that may still begin a stop string, trailing space, or half a character waits
    until more text comes."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of ``text`` streamed
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token: int) -> bool:
        """Adds a token; ``False`` once a stop string has appeared (the reply ends)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cuts = [self.text.find(s) for s in self.stop if s in self.text]
        if cuts:
            self.text = self.text[: min(cuts)]
            return False
        return True

    def delta(self, final: bool = False) -> str:
        """The text not streamed yet that can be streamed now (``final``: all of it)."""
        text = self.text.rstrip()
        end = len(text) if final else min(len(text), len(self.text) - self.hold)
        if not final and text.endswith("\ufffd"):  # a character cut in its middle
            end = min(end, len(text) - 1)
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent : end], end
        return piece


class _TextStream:
    """Generation's tokens (one row) to ``on_text``, as the text each step adds."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], stop: set[int]):
        self.reply, self.on_text, self.stop = ReplyText(tokenizer), on_text, stop
        self.done = False

    def __call__(self, tokens: torch.Tensor) -> None:
        token = int(tokens[0])
        if self.done or token in self.stop:
            self.done = True
            return
        self.reply.add(token)
        piece = self.reply.delta()
        if piece:
            self.on_text(piece)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Predictor:
    """A saved model ready to caption images and answer questions.

    Args:
        model_dir: a directory written by ``save_pretrained`` (with its tokenizer).
        device: ``auto``, ``cpu``, ``cuda``...
        generation: decoding settings (default: greedy, up to 32 new tokens).
    """

    def __init__(
        self, model_dir: str | Path, *, device: str = "auto", generation: GenerationConfig | None = None
    ):
        self.device = _device(device)
        self.model_dir = Path(model_dir)
        self.model = from_pretrained(model_dir).to(self.device).eval()
        self.tokenizer = load_tokenizer(model_dir)
        settings = self.model.config.processor  # what the model was trained with
        self.processor = Processor(
            self.tokenizer,
            tokens_per_image=self.model.tokens_per_image,
            config=settings,
            tiling=self.model.tiling,
        )
        self.transform = encoder_transform(self.model.encoder, mode=settings.resize)
        self.generation = dataclasses.replace(
            generation or GenerationConfig(),
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.processor.pad_token_id,
        )

    @torch.no_grad()
    def predict(
        self,
        images: list[Image.Image],
        task: str,
        questions: list[str] | None = None,
        support: Sequence[Sequence[Shot]] | None = None,
    ) -> list[str]:
        """One text per image: its caption, or the answer to its question.

        ``support``: for each image, the few-shot examples placed before it in its prompt
        (``Processor.prompt_ids``); the same number for every image keeps batches even.
        """
        questions = questions or [None] * len(images)
        support = support or [()] * len(images)
        if not len(images) == len(questions) == len(support):
            raise InputError("give one question and one support list per image")
        prompts, pixels = [], []
        for image, question, shots in zip(images, questions, support):
            pairs = [(shot.question, shot.answer) for shot in shots]
            own = upright([shot.image for shot in shots] + [image])
            prompts.append(
                self.processor.prompt_ids(task, question=question, support=pairs, image_sizes=sizes_of(own))
            )
            pixels += own
        return self._generate(prompts, pixels)

    @torch.no_grad()
    def chat(
        self, messages: Sequence[dict[str, Any]], *, on_text: Callable[[str], None] | None = None
    ) -> str:
        """The assistant's next reply to a conversation.

        ``messages`` take transformers' chat format: ``{"role", "content"}`` where content is a
        string, or a list of parts ``{"type": "text", "text": ...}`` and ``{"type": "image",
        "image": PIL image or path}``; a history keeps its images where they were asked about.
        ``on_text`` receives the reply piece by piece as it is generated.
        """
        streamer = None
        if on_text is not None:
            streamer = _TextStream(self.tokenizer, on_text, set(_ids(self.generation.eos_token_id)))
        return self.chat_batch([messages], streamer=streamer)[0]

    @torch.no_grad()
    def chat_batch(self, conversations: Sequence[Sequence[dict[str, Any]]], *, streamer=None) -> list[str]:
        """The next reply to each conversation, generated together."""
        prompts, images = [], []
        for messages in conversations:
            texts, own = conversation_inputs(messages)
            own = upright(own)
            prompts.append(self.processor.messages_prompt_ids(texts, image_sizes=sizes_of(own)))
            images += own
        return self._generate(prompts, images, streamer=streamer)

    @torch.no_grad()
    def complete(self, images: list[Image.Image], document: str) -> str:
        """What follows an interleaved document (``<image>`` where each of ``images`` goes): a
        Flamingo-style few-shot prompt such as ``"<image>red<image>blue<image>"``."""
        return self.complete_batch([(images, document)])[0]

    @torch.no_grad()
    def complete_batch(self, documents: Sequence[tuple[list[Image.Image], str]]) -> list[str]:
        """:meth:`complete` for several documents, generated together."""
        prompts, pixels = [], []
        for images, document in documents:
            markers = document.count(IMAGE_TOKEN)
            if markers != len(images):
                raise InputError(f"the document has {markers} <image> marker(s) for {len(images)} image(s)")
            images = upright(images)
            prompts.append(self.processor.document_prompt_ids(document, image_sizes=sizes_of(images)))
            pixels += images
        return self._generate(prompts, pixels)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The encoder's input ``(N_tiles, 3, H, W)`` for PIL images in any mode, each converted
        as the CLI and the server convert files (``upright_rgb``: EXIF orientation, transparency
        on white, palettes looked up), cut into the model's tiles (one per image without
        tiling), then resized and normalised as the model was trained."""
        return tile_pixels(upright(images), self.processor.tiling, self.transform)[0]

    def _too_long(self, length: int, images: Sequence[Image.Image]) -> str:
        """Why a prompt does not fit, naming the image that takes the most tokens and the settings
        that would make it fit."""
        message = f"a prompt of {length} tokens is longer than max_length={self.processor.max_length}"
        if not images:
            return message
        tiling = self.processor.tiling
        largest = max(images, key=lambda im: tiling.num_tokens((im.height, im.width)))
        tokens = tiling.num_tokens((largest.height, largest.width))
        tiles = tiling.num_tiles((largest.height, largest.width))
        return (
            f"{message}: its largest image ({largest.width}x{largest.height}) takes {tokens} tokens "
            f"({tiles} tile(s) with processor.tiling {self.model.config.processor.tiling.name!r}); raise "
            "processor.max_length or bound the tiles (processor.tiling.max_tiles) when training the model"
        )

    def _generate(self, prompts: list[list[int]], images: list[Image.Image], streamer=None) -> list[str]:
        too_long = max(len(p) for p in prompts)
        if too_long > self.processor.max_length:
            raise InputError(self._too_long(too_long, images))
        batch = self.processor.pad([{"input_ids": p} for p in prompts], side="left")
        pixels, sizes = tile_pixels(images, self.processor.tiling, self.transform) if images else (None, None)
        new = generate(
            self.model,
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            None if pixels is None else pixels.to(self.device),
            self.generation,
            image_sizes=torch.tensor(sizes) if sizes and self.processor.tiling.splits else None,
            streamer=streamer,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def upright(images: Sequence[Image.Image]) -> list[Image.Image]:
    """Images in RGB and upright (``upright_rgb``), before their sizes are read."""
    return [upright_rgb(image)[0] for image in images]


def sizes_of(images: Sequence[Image.Image]) -> list[tuple[int, int]]:
    return [(image.height, image.width) for image in images]


def _ids(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def conversation_inputs(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, str]], list[Image.Image]]:
    """Chat messages in transformers' format to vlm's (``<image>`` markers in string contents)
    and their images in reading order. Raises ``InputError`` on unknown roles or parts."""
    texts, images = [], []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise InputError(f"message {i}: unknown role {role!r}; roles are system, user, assistant")
        if isinstance(content, str):
            if IMAGE_TOKEN in content:
                raise InputError(
                    f"message {i}: give images as {{'type': 'image'}} parts, not {IMAGE_TOKEN} in text"
                )
            texts.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InputError(f"message {i}: content must be a string or a list of parts")
        text = ""
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text += str(part.get("text", ""))
            elif kind == "image":
                images.append(_part_image(part, i))
                text += IMAGE_TOKEN + "\n"
            else:
                raise InputError(f"message {i}: unknown part type {kind!r}; parts are 'text' and 'image'")
        texts.append({"role": role, "content": text})
    return texts, images


def _part_image(part: dict[str, Any], message: int) -> Image.Image:
    image = part.get("image", part.get("path"))
    if isinstance(image, Image.Image):
        return image  # converted with every other image (Predictor.pixel_values)
    if isinstance(image, (str, Path)):
        return load_image(image)
    raise InputError(f"message {message}: an image part needs 'image' (a PIL image or a path)")


def read_support(path: str | Path) -> list[Shot]:
    """Support examples from a JSONL file (or a JSON list) of ``{"image", "answer", "question"
    (for VQA)}``; image paths are relative to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--support {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as err:
        raise InputError(f"--support {path}: not JSON or JSONL ({err.msg})") from err
    shots = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("image") or not isinstance(row.get("answer"), str):
            raise InputError(f"--support {path}, example {number}: needs 'image' and 'answer'")
        shots.append(Shot(load_image(path.parent / row["image"]), row["answer"], row.get("question")))
    return shots


def load_image(path: str | Path) -> Image.Image:
    """An image file decoded as training decodes it; ``InputError`` naming the file otherwise."""
    try:
        return decode_image(Path(path).read_bytes())[0]
    except FileNotFoundError as err:
        raise InputError(f"{path}: no such image file") from err
    except (OSError, BadSample) as err:
        raise InputError(f"cannot read image {path}: {err}") from err


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def _is_shard_input(path: Path) -> bool:
    return path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar")))


def _skip(stats: DecodeStats, name: str, reason: str, detail: str = "") -> None:
    stats.skipped[reason] += 1
    log.warning("skipping %s: %s%s", name, reason, f" ({detail})" if detail else "")


def plan_inputs(paths: Iterable[str], stats: DecodeStats) -> list[tuple[str, Path]]:
    """What the named inputs hold, without decoding anything: ``("image", file)`` and
    ``("shards", path)`` in reading order (a folder's image files sorted). A missing path
    (``missing``) and a folder without images (``no_images``) are skipped, warned about and
    counted in ``stats``."""
    sources: list[tuple[str, Path]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            _skip(stats, raw, "missing", "no such file or directory")
        elif _is_shard_input(path):
            sources.append(("shards", path))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_image_file(p))
            if not files:
                _skip(stats, raw, "no_images", f"the folder holds no {', '.join(IMAGE_EXTENSIONS)} files")
            sources += [("image", file) for file in files]
        else:
            sources.append(("image", path))
    return sources


def read_sources(sources: Iterable[tuple[str, Path]], stats: DecodeStats) -> Iterator[Item]:
    """The images of :func:`plan_inputs`' sources, decoded as they are read. Whatever cannot be
    read is skipped with a warning and counted in ``stats`` by reason; nothing raises."""
    for kind, path in sources:
        if kind == "shards":
            shards = ImageTextShards(str(path), shuffle_shards=False, shuffle_buffer=0, rank=0, world_size=1)
            try:
                for sample in shards:
                    yield Item(f"{Path(sample['url']).name}:{sample['key']}", sample["image"], sample["text"])
            finally:  # also when the consumer stops early
                stats.merge(shards.stats)
            continue
        try:
            image = decode_image(path.read_bytes())[0]
        except BadSample as bad:
            _skip(stats, str(path), bad.reason, str(bad))
            continue
        except OSError as err:  # permissions, a device error
            _skip(stats, str(path), "unreadable", f"{type(err).__name__}: {err}")
            continue
        stats.ok += 1
        yield Item(str(path), image, {})


def read_inputs(paths: Iterable[str], stats: DecodeStats | None = None) -> Iterator[Item]:
    """Images from files, folders (their image files, sorted) and webdataset shards; anything
    unreadable is skipped with a warning and counted in ``stats``."""
    stats = DecodeStats() if stats is None else stats
    yield from read_sources(plan_inputs(paths, stats), stats)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_model_dir(model_dir: str) -> None:
    """Fails before any image is read on a directory that holds no model; the loader names
    every other broken file (``vlm.hub``)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(f"--model {model_dir}: no such directory")
    if not any((path / name).is_file() for name in ("model.safetensors", "bridge.safetensors")):
        raise ConfigError(
            f"--model {model_dir} holds no weights (model.safetensors or bridge.safetensors); "
            "point it at a directory written by `vlm train` or save_pretrained"
        )
