"""From decoded samples to model batches: task examples, transforms, tokens, collation.

A shard sample may yield several examples: its caption (task ``caption``), each of its
questions (task ``vqa``), its conversation (``chat``) or its interleaved document
(``document``); the images are transformed once and shared by the sample's examples.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from vlm.data.packing import PackedStream
from vlm.data.pipeline import ImageTextShards

log = logging.getLogger(__name__)

TASKS = ("caption", "vqa", "chat", "document")
#: The tasks whose examples are one prompt and one answer about all of a sample's images.
ANSWER_TASKS = ("caption", "vqa")


def task_examples(text: dict[str, Any], tasks: Sequence[str] = TASKS) -> Iterator[dict[str, Any]]:
    """The examples one sample's text holds, for the tasks asked for.

    Text forms (``data.samples``): ``caption`` / ``captions`` (the first is the training
    target, all are references), ``question`` + ``answers``, ``qa``: a list of ``{question,
    answer(s)}``, ``messages`` (a conversation) or ``document``.
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; tasks are {TASKS}")
    if "caption" in tasks:
        captions = text.get("captions") or ([text["caption"]] if text.get("caption") else [])
        if captions:
            yield {"task": "caption", "answer": captions[0], "references": list(captions)}
    if "vqa" in tasks:
        pairs = text.get("qa") or ([text] if "question" in text else [])
        for qa in pairs:
            answers = qa.get("answers") or [qa["answer"]]
            # The most frequent human answer is the target; all of them score predictions.
            target = Counter(answers).most_common(1)[0][0]
            yield {"task": "vqa", "question": qa["question"], "answer": target, "answers": list(answers)}
    if "chat" in tasks and "messages" in text:
        yield {"task": "chat", "messages": text["messages"]}
    if "document" in tasks and "document" in text:
        yield {"task": "document", "document": text["document"]}


def encode_example(
    processor, example: dict[str, Any], num_images: int, image_sizes: list | None = None
) -> dict[str, Any] | None:
    """Tokens and labels of one example (``None`` when it cannot fit ``max_length``);
    ``image_sizes``: its images' ``(height, width)``, for a processor that tiles them."""
    task = example["task"]
    if task == "turns":
        return processor.encode_turns(example["turns"], num_images=num_images, image_sizes=image_sizes)
    if task == "chat":
        return processor.encode_messages(example["messages"], image_sizes=image_sizes)
    if task == "document":
        return processor.encode_document(example["document"], image_sizes=image_sizes)
    return processor.encode(
        task,
        question=example.get("question"),
        answer=example["answer"],
        num_images=num_images,
        image_sizes=image_sizes,
    )


class ExampleStream(IterableDataset):
    """Tokenised examples with their pixels, ready for :func:`collate`.

    Args:
        samples: decoded samples (an :class:`ImageTextShards`).
        processor: a ``vlm.processor.Processor``.
        transform: PIL image -> tensor (see ``data.transforms.encoder_transform``).
        tasks: which examples to draw from each sample.
        rank, world_size: deal examples round robin to ranks (with every rank reading all
            shards): any world size then sees the same global batches as one process.
        pack_turns: put all of a sample's examples in one sequence that shares the image prefix
            (turns in an order shuffled per sample and epoch; see ``Processor.encode_turns``):
            the images and their tokens are paid for once, and each turn still sees only the
            images and itself.
    """

    def __init__(
        self,
        samples: ImageTextShards,
        processor,
        transform: Callable,
        tasks: Sequence[str] = TASKS,
        *,
        rank: int = 0,
        world_size: int = 1,
        pack_turns: bool = False,
    ):
        super().__init__()
        self.samples, self.processor, self.transform, self.tasks = samples, processor, transform, tuple(tasks)
        self.rank, self.world_size, self.pack_turns = rank, world_size, pack_turns

    def set_epoch(self, epoch: int) -> None:
        self.samples.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        truncated_before, dropped_before = self.processor.truncated, Counter(self.processor.dropped)
        index = 0
        for sample in self.samples:
            examples = []
            found = list(task_examples(sample["text"], self.tasks))
            turns = [e for e in found if e["task"] in ANSWER_TASKS]
            if self.pack_turns and turns:
                random.Random(f"{self.samples.seed}:{self.samples.epoch}:{sample['key']}").shuffle(turns)
                found = [{"task": "turns", "turns": turns}] + [
                    e for e in found if e["task"] not in ANSWER_TASKS
                ]
            for example in found:
                if index % self.world_size == self.rank:
                    examples.append(example)
                index += 1
            if not examples:
                continue
            name, tensor, sizes = self._visual(sample)
            num_images = 0 if tensor is None else len(sizes)
            tiles = [0]  # tiles[k]: the tiles of the first k images
            for size in sizes:
                tiles.append(tiles[-1] + (1 if size is None else self.processor.tiling.num_tiles(size)))
            for example in examples:
                encoded = encode_example(self.processor, example, num_images, sizes)
                if encoded is None:
                    continue
                kept = encoded.pop("num_images", num_images)  # truncation may leave out later images
                visual = {} if not kept else {name: tensor if kept == num_images else tensor[: tiles[kept]]}
                if kept and self.processor.tiling.splits:
                    visual["image_sizes"] = sizes[:kept]
                yield {**example, **encoded, **visual, "key": sample["key"]}
        truncated = self.processor.truncated - truncated_before
        if truncated:
            log.warning(
                "%d example(s) longer than max_length=%d were truncated", truncated, self.processor.max_length
            )
        dropped = self.processor.dropped - dropped_before
        if dropped:
            log.warning("dropped example(s) that do not fit max_length: %s", dict(dropped))

    def _visual(self, sample: dict[str, Any]) -> tuple[str, torch.Tensor | None, list]:
        """The sample's images as the model takes them (their tiles, one after another), or
        its cached features; and each image's ``(height, width)``."""
        if "features" in sample:  # from a frozen-feature cache: the encoder already ran
            features = sample["features"]
            return "image_features", features, sample.get("image_sizes", [None] * len(features))
        images = sample["images"] if "images" in sample else [sample["image"]] if "image" in sample else []
        if not images:  # a text-only conversation
            return "pixel_values", None, []
        return "pixel_values", *tile_pixels(images, self.processor.tiling, self.transform)


def tile_pixels(images: Sequence[Any], tiling, transform: Callable) -> tuple[torch.Tensor, list]:
    """The encoder's input for images: every image's tiles (``tiling.cut``) transformed and
    stacked in reading order ``(N_tiles, 3, H, W)``, and each image's ``(height, width)``."""
    tiles, sizes = [], []
    for image in images:
        sizes.append((image.height, image.width))
        tiles += [transform(tile) for tile in tiling.cut(image)]
    return torch.stack(tiles), sizes


def collate(examples: list[dict[str, Any]], processor, *, side: str = "right") -> dict[str, Any]:
    """A batch: padded ``input_ids`` / ``attention_mask`` / ``labels``; the images as
    ``pixel_values`` ``(N_distinct, 3, H, W)`` (or their cached ``image_features``) with
    ``image_index`` ``(N_img,)`` giving every image of the batch in reading order, so examples
    drawn from the same sample share one encoding; and the examples' metadata. A packed row
    (``PackedStream``) carries a list of its examples' images and a list of each metadata field."""
    batch = processor.pad(examples, side=side)
    visual = "image_features" if any("image_features" in e for e in examples) else "pixel_values"
    rows: dict[int, int] = {}  # examples of one sample carry the very same tensor
    distinct, index = [], []
    for example in examples:
        tensors = example.get(visual)
        tensors = [t for t in tensors if t is not None] if isinstance(tensors, list) else [tensors]
        for tensor in tensors:
            if tensor is None:  # text only
                continue
            if id(tensor) not in rows:
                rows[id(tensor)] = sum(len(t) for t in distinct)
                distinct.append(tensor)
            index += range(rows[id(tensor)], rows[id(tensor)] + len(tensor))
    if distinct:
        batch[visual] = torch.cat(distinct)
        batch["image_index"] = torch.tensor(index, dtype=torch.long)
    sizes = [size for e in examples for size in _flat(e.get("image_sizes"))]
    if sizes:  # images cut into tiles: each image's size, in reading order
        batch["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
    for field in ("task", "key", "question", "answers", "references"):
        batch[field] = [e.get(field) for e in examples]
    return batch


def _flat(sizes: Any) -> list:
    """A packed row's per-example lists of sizes, or one example's, as one list."""
    if not sizes:
        return []
    if isinstance(sizes[0], list):
        return [size for own in sizes for size in _flat(own)]
    return list(sizes)


def make_loader(
    shards: str | Sequence[str],
    processor,
    transform: Callable,
    *,
    batch_size: int,
    tasks: Sequence[str] = TASKS,
    num_workers: int = 0,
    padding_side: str = "right",
    example_split: tuple[int, int] = (0, 1),
    pack_turns: bool = False,
    pack_length: int = 0,
    **shard_options: Any,
) -> DataLoader:
    """A DataLoader of model batches from shards.

    Args:
        example_split: ``(rank, world_size)`` for round-robin example dealing (see
            :class:`ExampleStream`); shard dealing is set through ``shard_options``.
        pack_turns: see :class:`ExampleStream`.
        pack_length: pack several examples into rows of up to this many tokens
            (:class:`data.packing.PackedStream`); 0 for one example per row.
        shard_options: passed to :class:`ImageTextShards`.
    """
    rank, world_size = example_split
    samples = ImageTextShards(shards, **shard_options)
    stream = ExampleStream(
        samples, processor, transform, tasks, rank=rank, world_size=world_size, pack_turns=pack_turns
    )
    if pack_length:
        stream = PackedStream(stream, processor, pack_length)
    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=partial(collate, processor=processor, side=padding_side),
        # Its own generator: starting an epoch must not draw from the global RNG (dropout's),
        # or a resumed run would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(shard_options.get("seed", 0)),
    )
