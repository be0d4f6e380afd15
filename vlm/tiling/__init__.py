"""How an image becomes tiles (``ProcessorConfig.tiling``): one file per kind, registered here."""

from vlm.tiling import anyres, none, split  # noqa: F401  (each registers its kind)
from vlm.tiling.base import Tiling

__all__ = ["Tiling"]
