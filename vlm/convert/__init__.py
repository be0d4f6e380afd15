"""Converters from published checkpoint formats to vlm models.

A directory saved by transformers for one of the architectures below loads with
``vlm.from_pretrained(DIR)``: its weights are mapped into vlm's own encoder, bridge and decoder.
Adding a format is one module with a ``@register_converter(...)`` function plus its import here.
"""

from vlm.convert import blip2, idefics, llava  # noqa: F401  (registration)
from vlm.convert.registry import CONVERTERS, register_converter, supported

__all__ = ["CONVERTERS", "register_converter", "supported"]
