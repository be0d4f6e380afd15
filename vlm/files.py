"""Reading the files of a model directory, with one clear message for each way they break."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vlm.schema import ConfigError

REWRITE = "copy it again, or write the directory again with model.save_pretrained(DIR)"


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``; a file that is not one is a :class:`ConfigError` naming it."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file} is not valid JSON ({err}); {REWRITE}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} holds a JSON {type(data).__name__}, not an object; {REWRITE}")
    return data


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a damaged one is a :class:`ConfigError` naming it."""
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"{file} is damaged or not a safetensors file ({err}); {REWRITE}") from None
