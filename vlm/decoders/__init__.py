"""Language decoders. Each module registers itself; add one file and one import line."""

from vlm.decoders import hf  # noqa: F401  (registration)
from vlm.decoders.hf import HFDecoder, HFDecoderConfig, LoraSettings

__all__ = ["HFDecoder", "HFDecoderConfig", "LoraSettings"]
