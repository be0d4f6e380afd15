"""Image encoders. Each module registers itself; add one file and one import line."""

from vlm.encoders import clip, vit  # noqa: F401  (registration)
from vlm.encoders.base import ImageEncoder
from vlm.encoders.clip import CLIPConfig, CLIPEncoder
from vlm.encoders.vit import ViTConfig, ViTEncoder

__all__ = ["CLIPConfig", "CLIPEncoder", "ImageEncoder", "ViTConfig", "ViTEncoder"]
