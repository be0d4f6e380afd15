"""Converters from published checkpoint formats to vlm models, and exports back.

A directory saved by transformers for one of the architectures below loads with
``vlm.from_pretrained(DIR)``: its weights are mapped into vlm's own encoder, bridge and decoder.
``export_transformers`` (``vlm export``) writes a vlm model the other way. Each format is a
:class:`Format` (converter, export, transformers reference model, connector, input layout)
registered once in :data:`FORMATS`; adding one is a module that calls
``register_format(Format(...))`` plus its import here. Each part's tensor names are one
:class:`~vlm.convert.common.KeyMap`, read one way by the converter and the other by the export.
"""

# The import order is the registration order: how benchmarks and tests list the formats.
# isort: off
from vlm.convert import llava, blip2, idefics  # noqa: F401  (registration)
from vlm.convert import idefics3  # noqa: F401  (registration: Idefics3, then SmolVLM)
from vlm.convert import llava_next  # noqa: F401  (registration: LLaVA-NeXT, then OneVision)

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
