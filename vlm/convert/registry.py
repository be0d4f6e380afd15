"""The converters by transformers architecture name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

CONVERTERS: dict[str, Callable[[Path, Any], Any]] = {}


def register_converter(*architectures: str):
    """Registers ``fn(path, hf_config) -> VisionLanguageModel`` for transformers ``architectures``."""

    def register(fn):
        for name in architectures:
            CONVERTERS[name] = fn
        return fn

    return register


def supported() -> list[str]:
    return sorted(CONVERTERS)
