"""Converters from published checkpoint formats to vlm models.

A directory saved by transformers for one of the architectures below loads with
``vlm.from_pretrained(DIR)``: its weights are mapped into vlm's own encoder, bridge and decoder.
Each format is a :class:`Format` (converter, transformers reference model, connector, input
layout) registered once in :data:`FORMATS`; adding one is a module that calls
``register_format(Format(...))`` plus its import here.
"""

# The import order is the registration order: how benchmarks and tests list the formats.
# isort: off
from vlm.convert import llava, blip2, idefics  # noqa: F401  (registration)

# isort: on
from vlm.convert.reference import IMAGE_TOKEN, IMAGE_TOKEN_ID, Size, placeholder_tokenizer
from vlm.convert.registry import (
    CONVERTERS,
    FORMATS,
    Format,
    check_export,
    export_transformers,
    register_format,
    supported,
)

__all__ = [
    "CONVERTERS",
    "FORMATS",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_ID",
    "Format",
    "Size",
    "check_export",
    "export_transformers",
    "placeholder_tokenizer",
    "register_format",
    "supported",
]
