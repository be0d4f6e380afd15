"""What every converter and export needs: reading transformers weights, renaming them both ways,
loading them exactly."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlm.encoders.base import CLIP_MEAN, CLIP_STD
from vlm.files import read_json, read_safetensors
from vlm.model import VisionLanguageModel
from vlm.schema import ConfigError
from vlm.weights import finish_assigned, load_covering, load_tokenizer

log = logging.getLogger(__name__)


class Checkpoint(dict):
    """A checkpoint's tensors by name, remembering which ones :func:`select` took, so that a
    conversion can say what it left behind."""

    def __init__(self, tensors: dict[str, Tensor], source: Path):
        super().__init__(tensors)
        self.source = source
        self.selected: set[str] = set()

    def warn_unused(self) -> list[str]:
        """Logs (and returns) the tensors no part of the model took."""
        unused = sorted(set(self) - self.selected)
        if unused:
            shown = ", ".join(unused[:8]) + (", ..." if len(unused) > 8 else "")
            log.warning(
                "%d tensor(s) in %s have no place in the converted model and were not loaded: %s",
                len(unused),
                self.source,
                shown,
            )
        return unused


def read_weights(path: Path) -> Checkpoint:
    """Every tensor of a transformers directory: ``model.safetensors``, its sharded index, or
    ``pytorch_model.bin``."""
    if (path / "model.safetensors").is_file():
        return Checkpoint(read_safetensors(path / "model.safetensors"), path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
        return Checkpoint({k: v for f in files for k, v in read_safetensors(path / f).items()}, path)
    if (path / "pytorch_model.bin").is_file():
        return Checkpoint(torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True), path)
    raise ConfigError(
        f"no weights in {str(path)!r}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def select(weights: dict[str, Tensor], prefixes: dict[str, str]) -> dict[str, Tensor]:
    """The tensors under any of ``prefixes`` (old -> new), each renamed by the longest prefix it
    starts with. Taken from a :class:`Checkpoint`, they count as used."""
    ordered = sorted(prefixes.items(), key=lambda item: len(item[0]), reverse=True)
    out, taken = {}, []
    for key, value in weights.items():
        for old, new in ordered:
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                taken.append(key)
                break
    if isinstance(weights, Checkpoint):
        weights.selected.update(taken)
    return out


@dataclass(frozen=True)
class KeyMap:
    """One table of names between a part's tensors in transformers and in vlm, read one way by
    the converter (:meth:`to_vlm`) and the other by the export (:meth:`to_transformers`).

    Attributes:
        renames: transformers prefix -> vlm prefix (the longest match renames a key).
        fused: (transformers' separate projections, vlm's one projection), e.g. q, k and v.
    """

    renames: dict[str, str]
    fused: tuple[tuple[tuple[str, ...], str], ...] = ()

    def __post_init__(self) -> None:
        if len(set(self.renames.values())) != len(self.renames):
            raise ValueError("a KeyMap's vlm names must be distinct for it to read both ways")

    def to_vlm(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        w, out = dict(weights), {}
        for parts, into in self.fused:
            fuse(w, parts, into, out)
        return out | select(w, self.renames)

    def to_transformers(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        w, out = dict(state), {}
        for parts, into in self.fused:
            unfuse(w, into, parts, out)
        return out | select(w, {new: old for old, new in self.renames.items()})

    def transformers_names(self, key: str) -> list[str]:
        """The transformers tensor(s) vlm's ``key`` is made of (for error messages)."""
        for parts, into in self.fused:
            for kind in ("weight", "bias"):
                if key == f"{into}.{kind}":
                    return [f"{p}.{kind}" for p in parts]
        return list(select({key: None}, {new: old for old, new in self.renames.items()})) or [key]


def fuse(w: dict[str, Tensor], parts: tuple[str, ...], into: str, out: dict[str, Tensor]) -> None:
    """Concatenates the weights (and biases, when present) of separate projections taken from
    ``w`` into the one projection ``into``, written to ``out``. Missing parts are skipped: a
    table may name layers a model has only every k-th time (the Q-Former's cross-attention)."""
    for kind in ("weight", "bias"):
        if f"{parts[0]}.{kind}" in w:
            out[f"{into}.{kind}"] = torch.cat([w.pop(f"{p}.{kind}") for p in parts])


def unfuse(w: dict[str, Tensor], fused: str, parts: tuple[str, ...], out: dict[str, Tensor]) -> None:
    """The inverse of :func:`fuse`: splits ``fused``'s weight (and bias, when present) taken from
    ``w`` into equal ``parts`` written to ``out``."""
    for kind in ("weight", "bias"):
        if f"{fused}.{kind}" in w:
            for part, tensor in zip(parts, w.pop(f"{fused}.{kind}").chunk(len(parts))):
                out[f"{part}.{kind}"] = tensor


def fit_shapes(module: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with each tensor shaped as ``module``'s of that name where the two differ only
    in dimensions of size 1 (BLIP-2 keeps its class token as ``(1, 1, D)``, vlm as ``(D,)``)."""
    own = module.state_dict()

    def fit(name: str, tensor: Tensor) -> Tensor:
        target = own.get(name)
        if target is None or target.shape == tensor.shape:
            return tensor
        if [n for n in target.shape if n != 1] != [n for n in tensor.shape if n != 1]:
            return tensor  # a real mismatch: loading reports it
        return tensor.reshape(target.shape)

    return {name: fit(name, tensor) for name, tensor in state.items()}


def write_into(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Copies ``state`` into transformers' ``module`` for an export: every tensor has its place."""
    module.load_state_dict(fit_shapes(module, state))


def finish(model: VisionLanguageModel, weights: Checkpoint) -> VisionLanguageModel:
    """After every part is loaded: no parameter left empty, and the checkpoint's leftovers named."""
    finish_assigned(model)
    weights.warn_unused()
    return model


def load_exact(module: nn.Module, state: dict[str, Tensor], what: str, keymap: KeyMap | None = None) -> None:
    """Loads ``state`` into ``module`` (its tensors become the parameters); every parameter must
    be covered (a tied weight under either of its names) and every tensor used. With a
    ``keymap``, ``state`` has transformers' names: renamed by it, and missing tensors named as
    the checkpoint names them."""
    if keymap is not None:
        state = keymap.to_vlm(state)
    missing, unexpected = load_covering(module, fit_shapes(module, state), assign=True)
    if keymap is not None:
        missing = [name for key in missing for name in keymap.transformers_names(key)]
    if missing or unexpected:
        raise ConfigError(
            f"the checkpoint's {what} weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )


def image_stats(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation in ``preprocessor_config.json`` (or in ``processor_config.json``'s
    image processor, where recent transformers save it), or CLIP's (what these models use)."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        file = path / name
        if file.is_file():
            pre = json.loads(file.read_text())
            pre = pre.get(key, {}) if key else pre
            if "image_mean" in pre and "image_std" in pre:
                return tuple(pre["image_mean"]), tuple(pre["image_std"])
    return CLIP_MEAN, CLIP_STD


def refuse(problems: dict[str, bool], target: str) -> None:
    """One ``ConfigError`` naming every option (the keys that are true) ``target`` lacks."""
    found = [k for k, v in problems.items() if v]
    if found:
        raise ConfigError(
            f"this model does not export to {target}: " + ", ".join(found) + " has no counterpart there"
        )


def crop_image_processor(encoder: nn.Module) -> Any:
    """transformers' image processor doing what vlm's ``processor.resize = "crop"`` does: resize
    the short side to the encoder's size, centre-crop, normalise with its statistics."""
    import transformers  # noqa: PLC0415  (exports only)

    size = encoder.image_size
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(encoder.mean),
        image_std=list(encoder.std),
    )


def image_token_from_tokenizer(path: Path, token: str = "<image>") -> int:
    """The id of ``token`` in the tokenizer saved beside a checkpoint."""
    try:
        tokenizer = load_tokenizer(path)
    except ConfigError as err:
        raise ConfigError(f"{err}: the checkpoint's tokenizer names the {token} token's id") from err
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError(f"the tokenizer in {str(path)!r} has no {token} token")
    return token_id
