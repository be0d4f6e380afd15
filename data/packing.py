"""Sequence packing: several examples per training row instead of one row each plus padding.

Examples vary in length (a caption, a one-word answer, a sample's packed turns), so padding a
batch to its longest row wastes much of every step. :class:`PackedStream` fills rows of up to
``length`` tokens; ``Processor.pack`` gives each row ``sample_ids`` with which the model keeps
every example to itself (block-diagonal attention, positions restarting per example).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset

from vlm.schema import ConfigError

#: Fields that become one list per row: the examples' metadata, in row order.
_PER_EXAMPLE = ("task", "key", "question", "answers", "references")


class PackedStream(IterableDataset):
    """Rows of several examples, each row at most ``length`` tokens.

    First fit over ``open_rows`` rows being filled: an example goes into the first open row with
    room for it; when none has room and all are open, the fullest row is emitted first. The
    order is deterministic, so an exact resume (skipping batches) still works.

    Args:
        examples: a stream of encoded examples with their images (``ExampleStream``).
        processor: the ``Processor`` that encoded them (its ``pack`` joins a row).
        length: tokens per row; at least the processor's ``max_length``.
        open_rows: rows filled at once; more packs tighter but holds examples back longer.
    """

    def __init__(self, examples: IterableDataset, processor, length: int, *, open_rows: int = 16):
        super().__init__()
        if length < processor.max_length:
            raise ConfigError(
                f"data.pack_length={length} is shorter than data.max_length={processor.max_length}: "
                "an example of max_length would fit no row"
            )
        self.examples, self.processor, self.length, self.open_rows = examples, processor, length, open_rows

    def set_epoch(self, epoch: int) -> None:
        self.examples.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows: list[list[dict[str, Any]]] = []
        sizes: list[int] = []
        for example in self.examples:
            n = len(example["input_ids"])
            fits = next((i for i, size in enumerate(sizes) if size + n <= self.length), None)
            if fits is None:
                if len(rows) == self.open_rows:
                    fullest = max(range(len(rows)), key=sizes.__getitem__)
                    sizes.pop(fullest)
                    yield self._row(rows.pop(fullest))
                rows.append([])
                sizes.append(0)
                fits = len(rows) - 1
            rows[fits].append(example)
            sizes[fits] += n
        for row in rows:
            yield self._row(row)

    def _row(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        row = self.processor.pack(examples)
        visual = "image_features" if any("image_features" in e for e in examples) else "pixel_values"
        row[visual] = [e.get(visual) for e in examples]  # collate keeps them in reading order
        if any("image_sizes" in e for e in examples):
            row["image_sizes"] = [list(e.get("image_sizes", [])) for e in examples]
        for field in _PER_EXAMPLE:
            row[field] = [e.get(field) for e in examples]
        return row
