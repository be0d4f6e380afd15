"""Bridges. Each module registers itself; add one file and one import line."""

from vlm.bridges import linear, perceiver, qformer  # noqa: F401  (registration)
from vlm.bridges.base import Bridge
from vlm.bridges.linear import Projector, ProjectorConfig
from vlm.bridges.perceiver import PerceiverBridge, PerceiverConfig
from vlm.bridges.qformer import QFormer, QFormerConfig

__all__ = [
    "Bridge",
    "PerceiverBridge",
    "PerceiverConfig",
    "Projector",
    "ProjectorConfig",
    "QFormer",
    "QFormerConfig",
]
