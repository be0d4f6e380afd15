"""vlm: vision-language models from an image encoder, a bridge and a Hugging Face causal LM.

The names below are imported on first use (``vlm.build_model`` imports ``vlm.model``), so that
importing a light module of the package, such as the command line's parsers, does not import
torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Each public name and the module that defines it.
_EXPORTS = {
    "CLIPConfig": "vlm.encoders",
    "ConfigError": "vlm.schema",
    "HFDecoderConfig": "vlm.decoders",
    "LoraSettings": "vlm.decoders",
    "ModelConfig": "vlm.config",
    "MultiHeadAttention": "vlm.attention",
    "PerceiverConfig": "vlm.bridges",
    "ProjectorConfig": "vlm.bridges",
    "QFormerConfig": "vlm.bridges",
    "ViTConfig": "vlm.encoders",
    "VisionLanguageModel": "vlm.model",
    "build_model": "vlm.model",
    "from_pretrained": "vlm.hub",
    "register_bridge": "vlm.registry",
    "register_decoder": "vlm.registry",
    "register_encoder": "vlm.registry",
    "save_pretrained": "vlm.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
