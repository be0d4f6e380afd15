"""Converters from published checkpoint formats to vlm models.

A directory saved by transformers for one of the architectures below loads with
``vlm.from_pretrained(DIR)``: its weights are mapped into vlm's own encoder, bridge and decoder.
Adding a format is one module with a ``@register_converter(...)`` function plus its import here.
"""

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


from vlm.convert import blip2, idefics, llava  # noqa: E402,F401  (registration)
