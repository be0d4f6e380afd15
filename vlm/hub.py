"""Loading any model directory vlm reads: its own (``vlm.weights``) or transformers' LLaVA,
BLIP-2 and IDEFICS checkpoints (converted by ``vlm.convert``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from vlm.config import ModelConfig
from vlm.convert import CONVERTERS, supported
from vlm.files import read_json
from vlm.model import VisionLanguageModel, build_model
from vlm.schema import ConfigError
from vlm.weights import CONFIG_FILE, WEIGHTS_FILE, cast_parameters, load_weights, weights_file


def from_pretrained(path: str | Path, *, dtype: str | torch.dtype | None = None) -> VisionLanguageModel:
    """Builds the model ``path/config.json`` describes and loads its weights.

    ``path`` is a directory written by :func:`save_pretrained`, or one saved by transformers
    for a supported architecture (LLaVA, BLIP-2, IDEFICS; see :mod:`vlm.convert`), whose
    weights are converted into vlm's modules.

    Full checkpoints load without a random initialisation first: the model is built with its
    parameters on the meta device and the checkpoint's tensors become them, so loading takes
    about the checkpoint's size in memory, and the parameters keep the checkpoint's dtype.

    Args:
        dtype: cast the parameters to this dtype (e.g. ``"float32"``); ``None`` keeps the
            checkpoint's. (A cast needs memory for both copies while it runs.)
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{str(path)!r} is not a vlm model directory (no {CONFIG_FILE}); "
            "write one with model.save_pretrained(DIR)"
        )
    data = read_json(path / CONFIG_FILE)
    if "encoder" not in data or "decoder" not in data:
        model = _convert(path, data)
    else:
        try:
            config = ModelConfig.from_dict(data)
        except ConfigError as err:  # an unknown part or key: say which file holds it
            raise ConfigError(f"{path / CONFIG_FILE}: {err}") from None
        full = weights_file(path).name == WEIGHTS_FILE  # fails before building without weights
        model = build_model(config, empty=full)  # a bridge-only file loads onto a rebuilt base
        load_weights(model, path, assign=full)
    if dtype is not None:
        cast_parameters(model, getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model


def _convert(path: Path, data: dict[str, Any]) -> VisionLanguageModel:
    """A transformers checkpoint of a supported architecture, converted."""
    architectures = data.get("architectures") or []
    converter = next((CONVERTERS[a] for a in architectures if a in CONVERTERS), None)
    if converter is None:
        found = ", ".join(architectures) or f"model_type {data.get('model_type')!r}"
        raise ConfigError(
            f"{str(path)!r} holds a {found} checkpoint, which vlm cannot load. Supported: vlm's own "
            f"directories (model.save_pretrained) and transformers' {', '.join(supported())}"
        )
    try:
        return converter(path, AutoConfig.from_pretrained(path))
    except KeyError as err:  # a tensor the mapping expects is not in the checkpoint
        raise ConfigError(
            f"the checkpoint in {str(path)!r} has no tensor {err}; is it a complete "
            f"{', '.join(architectures)} checkpoint?"
        ) from err
