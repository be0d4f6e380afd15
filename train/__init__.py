"""Training: trainer, recipes, checkpoints, distributed.

The names below are imported on first use, as ``vlm``'s are: ``vlm train --help`` imports no
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Recipe": "vlm.train.recipe", "load_recipe": "vlm.train.recipe", "train": "vlm.train.trainer"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
