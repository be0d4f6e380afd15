"""transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5): CLIP tower, 2-layer GELU
projector, any causal LM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from torch import nn

from vlm.bridges.linear import ProjectorConfig
from vlm.config import ModelConfig
from vlm.convert.common import finish, load_exact, read_weights, select, vit_config, vit_state
from vlm.convert.reference import Size, llama_config, vision_config
from vlm.convert.registry import Format, register_format
from vlm.decoders.hf import HFDecoderConfig
from vlm.model import VisionLanguageModel, build_model
from vlm.schema import ConfigError

# Current transformers names first, then those of checkpoints saved before transformers 4.52.
VISION = {"model.vision_tower.": "", "vision_tower.vision_model.": "", "vision_tower.": ""}
PROJECTOR = {"model.multi_modal_projector.": "", "multi_modal_projector.": ""}
LANGUAGE = {
    "model.language_model.": "model.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "lm_head.": "lm_head.",
}


def convert_llava(path: Path, hf: Any) -> VisionLanguageModel:
    vision = hf.vision_config
    if vision.model_type != "clip_vision_model":
        raise ConfigError(
            f"LLaVA with a {vision.model_type!r} vision tower is not supported; vlm converts CLIP towers"
        )
    layer = hf.vision_feature_layer
    if not isinstance(layer, int):
        raise ConfigError(
            f"vision_feature_layer={layer} (several layers) is not supported; vlm takes one layer"
        )
    if hf.projector_hidden_act != "gelu":
        raise ConfigError(
            f"projector_hidden_act={hf.projector_hidden_act!r} is not supported; vlm's projector uses gelu"
        )
    config = ModelConfig(
        encoder=vit_config(
            vision, path, feature_layer=layer, keep_class_token=hf.vision_feature_select_strategy == "full"
        ),
        bridge=ProjectorConfig(name="mlp2x_gelu", bias=getattr(hf, "multimodal_projector_bias", True)),
        decoder=HFDecoderConfig(hf_config=hf.text_config.to_dict(), freeze=True),
        image_token_id=hf.image_token_id,
    )
    model = build_model(config, empty=True)  # the checkpoint's tensors become its parameters
    weights = read_weights(path)
    load_exact(model.encoder, vit_state(select(weights, VISION), vision.num_hidden_layers), "vision tower")
    load_exact(model.bridge, select(weights, PROJECTOR), "projector")
    load_exact(model.decoder.lm, select(weights, LANGUAGE), "language model")
    return finish(model, weights)


def reference_llava(size: Size, image_token_id: int) -> nn.Module:
    """transformers' LLaVA at ``size``: a CLIP tower and a Llama decoder."""
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            **vision_config(size, initializer_factor=size.init_range / 0.02)
        ),
        text_config=transformers.LlamaConfig(**llama_config(size)),
        image_token_id=image_token_id,
        initializer_range=size.init_range,
    )
    return transformers.LlavaForConditionalGeneration(config)


FORMAT = register_format(
    Format(
        name="llava",
        architectures=("LlavaForConditionalGeneration",),
        convert=convert_llava,
        reference=reference_llava,
        connector=("multi_modal_projector",),
    )
)
