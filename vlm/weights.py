"""Checkpoint files: ``config.json`` plus safetensors weights, written and read into built models.

Two kinds of checkpoint:
- full (``model.safetensors``): self-contained; the decoder's transformers config is stored
  in ``config.json``, so loading needs no other file.
- bridge-only (``bridge.safetensors``, a few MB): the trained bridge, loaded onto the same
  frozen encoder and decoder rebuilt from their own files (``encoder.checkpoint``,
  ``decoder.pretrained``).

Building the model a directory describes is :func:`vlm.hub.from_pretrained`'s job; this module
only needs modules that are built already.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file, save_model
from torch import nn
from transformers import AutoTokenizer

from vlm.config import ModelConfig
from vlm.files import read_safetensors
from vlm.schema import ConfigError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
BRIDGE_FILE = "bridge.safetensors"
TILING_PREFIX = "tiling."  # the tiling's weights in a bridge-only file


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    bridge_only: bool = False,
    tokenizer: Any = None,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Writes ``config.json`` and the weights (all of them, or the bridge's only) to ``path``,
    plus the tokenizer's files when one is given.

    Args:
        state_dict: the weights to write instead of ``model.state_dict()`` (e.g. the gathered
            full weights of a sharded model).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if bridge_only:
        problems = bridge_only_problems(model.config)
        if problems:
            raise ConfigError(
                "a bridge-only checkpoint needs a frozen base rebuilt from files, but "
                + "; ".join(problems)
                + ". Save the full model instead: model.save_pretrained(DIR)"
            )
        config = model.config
        bridge = (
            {k.removeprefix("bridge."): v for k, v in state_dict.items() if k.startswith("bridge.")}
            if state_dict is not None
            else model.bridge.state_dict()
        )
        # A tiling's learned embeddings (AnyRes' newline) are part of the connector too.
        tiling = (
            {k: v for k, v in state_dict.items() if k.startswith(TILING_PREFIX)}
            if state_dict is not None
            else {TILING_PREFIX + k: v for k, v in model.tiling.state_dict().items()}
        )
        save_file({k: v.contiguous() for k, v in {**bridge, **tiling}.items()}, path / BRIDGE_FILE)
        (path / WEIGHTS_FILE).unlink(missing_ok=True)
    else:
        config = _self_contained(model)
        if state_dict is not None:
            save_file({k: v.contiguous() for k, v in state_dict.items()}, path / WEIGHTS_FILE)
        else:
            save_model(model, str(path / WEIGHTS_FILE))  # handles tied weights (e.g. GPT-2's lm_head)
        (path / BRIDGE_FILE).unlink(missing_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def finish_assigned(model: nn.Module) -> None:
    """After loading into a model built ``empty``: refuses a parameter that no tensor filled."""
    empty = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if empty:
        raise ConfigError(f"the checkpoint has no weights for {empty[:4]} ({len(empty)} parameter(s))")


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating-point parameters to ``dtype``; buffers (rotary tables) keep their precision."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def weights_file(path: Path) -> Path:
    for name in (WEIGHTS_FILE, BRIDGE_FILE):
        if (path / name).is_file():
            return path / name
    raise ConfigError(
        f"no weights in {str(path)!r}: expected {WEIGHTS_FILE} or {BRIDGE_FILE}; "
        "write them with model.save_pretrained(DIR)"
    )


def load_weights(model: nn.Module, path: str | Path, *, assign: bool = False) -> None:
    """Loads a saved directory's weights (full or bridge-only) into a built model; ``assign``
    for full weights into a model built with ``build_model(..., empty=True)``."""
    file = weights_file(Path(path))
    weights = read_safetensors(file)
    if file.name == WEIGHTS_FILE:
        _load(lambda: _load_full(model, weights, assign=assign), file)
    else:
        tiling = {k.removeprefix(TILING_PREFIX): v for k, v in weights.items() if k.startswith(TILING_PREFIX)}
        bridge = {k: v for k, v in weights.items() if not k.startswith(TILING_PREFIX)}
        _load(lambda: (model.bridge.load_state_dict(bridge), model.tiling.load_state_dict(tiling)), file)


def load_covering(module, weights: dict[str, Any], *, assign: bool = False) -> tuple[list[str], list[str]]:
    """Loads ``weights`` into ``module`` (not strict) and returns the keys left missing and the
    unexpected ones; a tied weight (GPT-2's lm_head and wte) may be stored under either name or
    both, so its other name is not missing. ``assign``: the tensors become the parameters
    (for a model built with ``build_model(..., empty=True)``) instead of being copied into them."""
    alias = {name: id(p) for name, p in module.named_parameters(remove_duplicate=False)}
    result = module.load_state_dict(weights, strict=False, assign=assign)
    if assign:
        _retie(module, alias)
    loaded = {alias[k] for k in weights if k in alias}
    missing = [k for k in result.missing_keys if alias.get(k) not in loaded]
    return missing, list(result.unexpected_keys)


def _retie(module: nn.Module, alias: dict[str, int]) -> None:
    """Assigning replaces a tied parameter under the names loaded only: every name of a tied
    group (same parameter before loading) gets the one that was loaded."""
    groups: dict[int, list[str]] = {}
    for name, key in alias.items():
        groups.setdefault(key, []).append(name)
    for names in (g for g in groups.values() if len(g) > 1):
        params = [module.get_parameter(n) for n in names]
        loaded = next((p for p in params if p.device.type != "meta"), None)
        if loaded is None:
            continue
        for name in names:
            owner, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(owner), attribute, loaded)


def _load_full(model: nn.Module, weights: dict[str, Any], *, assign: bool = False) -> None:
    """Loads every weight: copied into the parameters, or ``assign``-ed to a model built empty."""
    missing, unexpected = load_covering(model, weights, assign=assign)
    if missing or unexpected:
        raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    if assign:
        finish_assigned(model)


#: The vocabulary files of transformers' slow tokenizers (Llama's, GPT-2's, BERT's, T5's, ...).
SLOW_VOCABULARIES = ("tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside a model (or any local tokenizer directory)."""
    if not (Path(path) / "tokenizer_config.json").is_file():
        raise ConfigError(
            f"no tokenizer in {str(path)!r} (no tokenizer_config.json); save one beside the model"
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exceptions for damaged files
        if not any((Path(path) / name).is_file() for name in ("tokenizer.json", *SLOW_VOCABULARIES)):
            # transformers then asks for sentencepiece to convert a slow tokenizer there is none of
            raise ConfigError(
                f"no tokenizer.json in {str(path)!r} (its tokenizer_config.json is there, its vocabulary "
                "is not): copy the tokenizer.json saved with it, or save the training tokenizer beside "
                "the model again: tokenizer.save_pretrained(DIR)"
            ) from None
        raise ConfigError(
            f"the tokenizer in {str(path)!r} cannot be loaded ({type(err).__name__}: {err}); save the "
            "training tokenizer beside the model again: tokenizer.save_pretrained(DIR)"
        ) from None


def _load(load, file: Path) -> None:
    try:
        load()
    except RuntimeError as err:  # missing keys or shape mismatch
        raise ConfigError(
            f"the weights in {str(file)!r} do not fit the model its config.json describes; "
            f"was the config edited after saving? ({err})"
        ) from err


def _self_contained(model: nn.Module) -> ModelConfig:
    """The config to store beside full weights: no references to the base's own files."""
    encoder = model.config.encoder
    if hasattr(encoder, "checkpoint"):
        encoder = dataclasses.replace(encoder, checkpoint=None)
    decoder = dataclasses.replace(
        model.config.decoder, pretrained=None, hf_config=model.decoder.lm.config.to_dict()
    )
    # The <image> row is in the saved embeddings already, so name it rather than add it again.
    return dataclasses.replace(
        model.config, encoder=encoder, decoder=decoder, image_token_id=model.image_token_id
    )


def bridge_only_problems(config: ModelConfig) -> list[str]:
    """Why a bridge-only checkpoint of this model could not be loaded back faithfully."""
    problems = []
    if not config.encoder.freeze:
        problems.append("the encoder is trainable (its weights would be lost)")
    if getattr(config.encoder, "checkpoint", None) is None:
        problems.append("encoder.checkpoint is not set (a random encoder cannot be rebuilt)")
    if not config.decoder.freeze or config.decoder.lora is not None:
        problems.append("the decoder is trainable or has LoRA adapters (they would be lost)")
    if config.decoder.pretrained is None:
        problems.append("decoder.pretrained is not set (a random decoder cannot be rebuilt)")
    return problems
