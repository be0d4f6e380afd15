"""vlm: vision-language models from an image encoder, a bridge and a Hugging Face causal LM."""

from vlm.attention import MultiHeadAttention
from vlm.bridges import PerceiverConfig, ProjectorConfig, QFormerConfig
from vlm.config import ModelConfig
from vlm.decoders import HFDecoderConfig, LoraSettings
from vlm.encoders import CLIPConfig, ViTConfig
from vlm.hub import from_pretrained
from vlm.model import VisionLanguageModel, build_model
from vlm.registry import register_bridge, register_decoder, register_encoder
from vlm.schema import ConfigError
from vlm.weights import save_pretrained

__version__ = "0.1.0"

__all__ = [
    "CLIPConfig",
    "ConfigError",
    "HFDecoderConfig",
    "LoraSettings",
    "ModelConfig",
    "MultiHeadAttention",
    "PerceiverConfig",
    "ProjectorConfig",
    "QFormerConfig",
    "ViTConfig",
    "VisionLanguageModel",
    "build_model",
    "from_pretrained",
    "register_bridge",
    "register_decoder",
    "register_encoder",
    "save_pretrained",
]
