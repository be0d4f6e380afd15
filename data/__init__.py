"""Data: webdataset pipelines, shard writers, the synthetic shapes dataset.

The names below are imported on first use, as ``vlm``'s are: ``vlm data --help`` imports no
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ImageTextShards": "vlm.data.pipeline",
    "make_loader": "vlm.data.loader",
    "write_shapes": "vlm.data.shapes",
    "write_shards": "vlm.data.writers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
