"""Captioning and VQA with a trained model: images, folders or shards in, texts out."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm.data.decode import IMAGE_EXTENSIONS, BadSample, DecodeStats, decode_image
from vlm.data.pipeline import ImageTextShards
from vlm.data.transforms import encoder_transform
from vlm.generate import GenerationConfig, generate
from vlm.hub import from_pretrained
from vlm.processor import Processor
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
        self.model = from_pretrained(model_dir).to(self.device).eval()
        self.tokenizer = load_tokenizer(model_dir)
        settings = self.model.config.processor  # what the model was trained with
        self.processor = Processor(
            self.tokenizer, tokens_per_image=self.model.tokens_per_image, config=settings
        )
        self.transform = encoder_transform(self.model.encoder, mode=settings.resize)
        self.generation = dataclasses.replace(
            generation or GenerationConfig(),
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.processor.pad_token_id,
        )

    @torch.no_grad()
    def predict(self, images: list[Image.Image], task: str, questions: list[str] | None = None) -> list[str]:
        """One text per image: its caption, or the answer to its question."""
        questions = questions or [None] * len(images)
        encoded = [self.processor.encode(task, question=q) for q in questions]
        if any(e is None for e in encoded):
            raise InputError(f"a prompt is longer than max_length={self.processor.max_length}")
        batch = self.processor.pad(encoded, side="left")
        pixels = torch.stack([self.transform(image) for image in images]).to(self.device)
        new = generate(
            self.model,
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            pixels,
            self.generation,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


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
