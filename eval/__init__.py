"""Evaluation: predictions, metrics, evaluation runs, benchmarks.

The names below are imported on first use, as ``vlm``'s are: ``vlm caption --help`` imports no
torch. (``evaluate`` is also the name of a module: once ``vlm.eval.evaluate`` has been imported
as a module, ``vlm.eval.evaluate`` is that module; ``from vlm.eval.evaluate import evaluate``
always gives the function.)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Predictor": "vlm.eval.predict", "evaluate": "vlm.eval.evaluate"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
