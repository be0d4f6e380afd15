"""The checkpoint formats vlm converts, each registered once by its own module.

A :class:`Format` carries what vlm needs to load a transformers checkpoint (``convert``) and what
the tests and benchmarks need to build and feed transformers' own model of it (``reference``,
``connector``, ``hf_inputs``). :data:`CONVERTERS` and :func:`supported` are derived from it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlm.convert.reference import IMAGE_TOKEN_ID, Size, placeholder_tokenizer
from vlm.schema import ConfigError


def same_layout(inputs: dict[str, Tensor], image_token_id: int) -> dict[str, Tensor]:
    """``hf_inputs`` of a format whose transformers model takes vlm's layout as it is."""
    return dict(inputs)


@dataclass(frozen=True)
class Format:
    """One checkpoint format.

    Attributes:
        name: the short name (``"llava"``), as ``vlm bench --models`` spells it.
        architectures: the transformers architecture names (``config.json``'s ``architectures``).
        convert: ``convert(path, hf_config) -> VisionLanguageModel``.
        reference: ``reference(size, image_token_id) -> nn.Module``, transformers' own model at
            :class:`~vlm.convert.reference.Size`, randomly initialised.
        connector: the attributes of transformers' model that form the connector (modules or
            parameters, on the model or on its inner ``.model``): what vlm's bridge holds.
        hf_inputs: ``hf_inputs(inputs, image_token_id) -> inputs`` turns vlm's inputs
            (``input_ids`` with placeholders, ``pixel_values`` ``(N_img, 3, H, W)`` in reading
            order) into the keyword arguments transformers' model takes for the same batch.
        export: ``export(model, tokenizer) -> (transformers model, processor)``: the way back,
            for vlm models whose bridge is one of ``bridges``; a ``ConfigError`` names any part
            or option the format has no counterpart for.
        bridges: the vlm bridges ``export`` takes.
        tilings: the vlm tilings (``processor.tiling.name``) ``export`` takes: a model goes to
            the format that takes both its bridge and its tiling.
        takes: besides the bridge and the tiling, which models ``export`` takes (LLaVA-NeXT
            a tower with a class token, OneVision one without); ``None``: all.
    """

    name: str
    architectures: tuple[str, ...]
    convert: Callable[[Path, Any], Any]
    reference: Callable[[Size, int], nn.Module]
    connector: tuple[str, ...]
    hf_inputs: Callable[[dict[str, Tensor], int], dict[str, Tensor]] = same_layout
    export: Callable[[Any, Any], tuple[nn.Module, Any]] | None = None
    bridges: tuple[str, ...] = ()
    tilings: tuple[str, ...] = ("none",)
    takes: Callable[[Any], bool] | None = None

    def connector_of(self, model: nn.Module) -> list[nn.Module | nn.Parameter]:
        """The connector's parts in transformers' ``model`` (``requires_grad_`` works on each)."""
        owner = getattr(model, "model", model)  # newer transformers nest the parts in ``.model``
        return [getattr(owner, p) if hasattr(owner, p) else getattr(model, p) for p in self.connector]

    def save_reference(
        self,
        size: Size,
        directory: str | Path,
        *,
        image_token_id: int = IMAGE_TOKEN_ID,
        dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """Builds the reference model, saves it (cast to ``dtype``) with the placeholder tokenizer
        in ``directory``, a checkpoint ``vlm.from_pretrained`` converts; returns the model."""
        model = self.reference(size, image_token_id)
        if dtype is not None:
            model.to(dtype)
        model.save_pretrained(directory)
        placeholder_tokenizer(size.vocab).save_pretrained(directory)
        return model


#: The registered formats by name, in registration order.
FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Adds ``fmt`` to :data:`FORMATS`; a name or architecture may be registered once."""
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    taken = set(fmt.architectures) & set(CONVERTERS)
    if taken:
        raise ValueError(f"architectures {sorted(taken)} already have a converter")
    FORMATS[fmt.name] = fmt
    return fmt


class _Converters(Mapping[str, Callable[[Path, Any], Any]]):
    """Architecture name -> converter, read from :data:`FORMATS` (so always in step with it)."""

    def _table(self) -> dict[str, Callable[[Path, Any], Any]]:
        return {a: f.convert for f in FORMATS.values() for a in f.architectures}

    def __getitem__(self, architecture: str) -> Callable[[Path, Any], Any]:
        return self._table()[architecture]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


CONVERTERS: Mapping[str, Callable[[Path, Any], Any]] = _Converters()


def supported() -> list[str]:
    """The transformers architectures vlm converts."""
    return sorted(CONVERTERS)


def export_transformers(
    model: Any, tokenizer: Any, out: str | Path, *, to: str | None = None
) -> tuple[Format, Path]:
    """Writes ``model`` as a transformers checkpoint of the format that takes its bridge and
    its tiling (config, safetensors weights, tokenizer, processor) to ``out``: the first such
    format, or ``to`` (a format's name, ``"smolvlm"``, or its architecture,
    ``"SmolVLMForConditionalGeneration"``) where several take it."""
    bridge, tiling = model.config.bridge.name, model.config.processor.tiling.name
    exporters = [f for f in FORMATS.values() if f.export is not None]
    if to is not None:
        named = [f for f in exporters if to == f.name or to in f.architectures]
        if not named:
            names = ", ".join(f"{f.name} ({f.architectures[0]})" for f in exporters)
            raise ConfigError(f"no transformers format named {to!r}; the exports: {names}")
        exporters = named
    fmt = next(
        (
            f
            for f in exporters
            if bridge in f.bridges and tiling in f.tilings and (f.takes is None or f.takes(model))
        ),
        None,
    )
    if fmt is None:
        takes = [f"{'/'.join(f.bridges)} with tiling {'/'.join(f.tilings)} ({f.name})" for f in exporters]
        raise ConfigError(
            f"no transformers format takes a {bridge!r} bridge with tiling {tiling!r}; "
            + ("that export takes: " if to is not None else "the exports take: ")
            + "; ".join(takes)
        )
    hf_model, processor = fmt.export(model, tokenizer)
    out = Path(out)
    hf_model.save_pretrained(out)
    processor.save_pretrained(out)
    return fmt, out


def probe_images(model: Any, count: int, *, generator: torch.Generator | None = None) -> tuple[dict, int]:
    """``count`` random square images of the encoder's size for ``model``, in vlm's layout, and
    the placeholders each takes: ``pixel_values`` holding each image's tiles (one without
    tiling) ``(count * tiles, 3, S, S)``, and ``image_sizes`` when the tiling cuts images into
    tiles (AnyRes then picks a wide grid and unpads it). The tests, the benchmark and
    :func:`check_export` build their batches from it."""
    tiling, side = model.tiling, model.encoder.image_size
    size = (side, side)
    pixels = torch.randn(count * tiling.num_tiles(size), 3, side, side, generator=generator)
    images = {"pixel_values": pixels}
    if tiling.splits:
        images["image_sizes"] = torch.tensor([size] * count)
    return images, tiling.num_tokens(size)


@torch.no_grad()
def check_export(model: Any, fmt: Format, out: str | Path, *, seed: int = 0) -> float:
    """The largest difference between the logits transformers' model loaded from ``out`` gives
    and ``model``'s, both in float32, on a probe batch: two rows of random text around one image
    each, random pixels."""
    import transformers  # noqa: PLC0415  (a check after an export only)

    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(
            model
        ).float()  # the caller's model keeps its dtype; a float32 one is not copied
    hf = getattr(transformers, fmt.architectures[0]).from_pretrained(out, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    vocab, image = model.decoder.lm.config.get_text_config().vocab_size, model.image_token_id
    text = torch.randint(0, vocab - 1, (2, 8), generator=g)
    text = text + (text >= image).long()  # never the placeholder itself
    images, placeholders = probe_images(model, 2, generator=g)
    ids = torch.cat([text[:, :2], torch.full((2, placeholders), image), text[:, 2:]], dim=1)
    inputs = {"input_ids": ids, **images}
    training = model.training
    try:
        ours = model.eval()(**inputs).logits
    finally:
        model.train(training)
    theirs = hf(**fmt.hf_inputs(inputs, image)).logits
    return (ours - theirs).abs().max().item()
