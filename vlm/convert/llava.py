"""transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5): CLIP tower, 2-layer GELU
projector, any causal LM."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from vlm.bridges.linear import ProjectorConfig
from vlm.config import ModelConfig
from vlm.convert.chat_template import export_chat_template
from vlm.convert.common import (
    crop_image_processor,
    finish,
    load_exact,
    read_weights,
    refuse,
    select,
    write_into,
)
from vlm.convert.reference import Size, llama_config, vision_config
from vlm.convert.registry import Format, register_format
from vlm.convert.towers import clip_tower, clip_tower_map, vit_config
from vlm.decoders.hf import HFDecoderConfig
from vlm.model import VisionLanguageModel, build_model
from vlm.schema import ConfigError

# Current transformers names first, then those of checkpoints saved before transformers 4.52.
VISION = {"model.vision_tower.": "", "vision_tower.vision_model.": "", "vision_tower.": ""}
PROJECTOR = {"model.multi_modal_projector.": "", "multi_modal_projector.": ""}


def language_prefixes(base: str) -> dict[str, str]:
    """Checkpoint names of the LM's tensors -> the causal LM's, whose base model is ``base``
    (``model`` for Llama, ``transformer`` for GPT-2). Current transformers keep the base model
    under ``model.language_model.`` in memory but save it under ``language_model.model.``,
    whatever the LM; before 4.52 the whole causal LM sat under ``language_model.``."""
    return {
        "model.language_model.": f"{base}.",
        "language_model.model.": f"{base}.",
        "language_model.lm_head.": "lm_head.",
        "language_model.": "",
        "lm_head.": "lm_head.",
    }


#: vlm's projector bridges by the activation transformers' LLaVA projector puts between its linears.
PROJECTOR_ACTS = {"mlp2x_gelu": "gelu", "linear": "linear"}


def read_projector(weights: dict[str, torch.Tensor], hf: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """The vlm bridge (``mlp2x_gelu`` or ``linear``) LLaVA's 2-layer projector in ``weights`` is,
    and its tensors (LLaVA's, LLaVA-NeXT's and OneVision's projectors alike)."""
    if hf.projector_hidden_act not in PROJECTOR_ACTS.values():
        raise ConfigError(
            f"projector_hidden_act={hf.projector_hidden_act!r} is not supported; vlm's projectors use "
            "gelu, or linear with an identity second layer (what vlm exports a linear bridge as)"
        )
    projector = select(weights, PROJECTOR)
    if hf.projector_hidden_act == "gelu":
        return "mlp2x_gelu", projector
    second = projector.pop("linear_2.weight")
    bias = projector.pop("linear_2.bias", None)
    if not torch.equal(second, torch.eye(len(second), dtype=second.dtype)) or (
        bias is not None and bias.any()
    ):
        raise ConfigError(
            "a linear LLaVA projector converts only with an identity second layer (as vlm exports "
            "a linear bridge); this one has another"
        )
    return "linear", projector


def projector_state(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """vlm's projector bridge as LLaVA's ``multi_modal_projector`` tensors: a ``linear`` bridge
    becomes the first linear and an identity second linear (exact)."""
    bridge = model.config.bridge
    projector = model.bridge.state_dict()
    if bridge.name == "linear":
        width = model.decoder.lm.config.get_text_config().hidden_size
        projector["linear_2.weight"] = torch.eye(width, dtype=projector["linear_1.weight"].dtype)
        if bridge.bias:
            projector["linear_2.bias"] = torch.zeros_like(projector["linear_1.bias"])
    return projector


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
    weights = read_weights(path)
    bridge, projector = read_projector(weights, hf)
    config = ModelConfig(
        encoder=vit_config(
            vision, path, feature_layer=layer, keep_class_token=hf.vision_feature_select_strategy == "full"
        ),
        bridge=ProjectorConfig(name=bridge, bias=getattr(hf, "multimodal_projector_bias", True)),
        decoder=HFDecoderConfig(hf_config=hf.text_config.to_dict(), freeze=True),
        image_token_id=hf.image_token_id,
    )
    model = build_model(config, empty=True)  # the checkpoint's tensors become its parameters
    tower = select(weights, VISION)
    load_exact(model.encoder, tower, "vision tower", clip_tower_map(vision.num_hidden_layers))
    load_exact(model.bridge, projector, "projector")
    lm = model.decoder.lm
    load_exact(lm, select(weights, language_prefixes(lm.base_model_prefix)), "language model")
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


def export_llava(model: VisionLanguageModel, tokenizer: Any) -> tuple[nn.Module, Any]:
    """transformers' ``LlavaForConditionalGeneration`` holding ``model``'s weights, and its
    ``LlavaProcessor``. A ``linear`` bridge becomes the projector's first linear, an identity
    activation and an identity second linear (exact). The processor's chat template renders
    conversations (string or parts contents) as the model was trained on them
    (:mod:`vlm.convert.chat_template`); it is saved as ``chat_template.jinja``."""
    bridge, processor = model.config.bridge, model.config.processor
    tower = clip_tower(model.encoder)
    refuse(
        {
            f"processor.resize={processor.resize!r} (LlavaProcessor resizes and centre-crops)": (
                processor.resize != "crop"
            ),
            f"bridge {bridge.name!r}": bridge.name not in PROJECTOR_ACTS,
            f"bridge.merge={getattr(bridge, 'merge', 1)}": getattr(bridge, "merge", 1) != 1,
        },
        "LlavaForConditionalGeneration",
    )
    lm = model.decoder.lm
    text_config = copy.deepcopy(lm.config)
    # Untied, with the head's own copy: transformers' LLaVA ties its head to an ``embed_tokens``
    # that not every LM has (GPT-2's is ``wte``). The copy is exact.
    text_config.tie_word_embeddings = False
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**tower.config),
        text_config=text_config,
        image_token_id=model.image_token_id,
        projector_hidden_act=PROJECTOR_ACTS[bridge.name],
        vision_feature_layer=tower.feature_layer,
        vision_feature_select_strategy="full" if tower.keep_class_token else "default",
        multimodal_projector_bias=bridge.bias,
        image_seq_length=model.tokens_per_image,
        tie_word_embeddings=False,
    )
    hf = transformers.LlavaForConditionalGeneration(config)
    write_into(getattr(hf.model.vision_tower, "vision_model", hf.model.vision_tower), tower.state)
    projector = projector_state(model)
    hf.model.multi_modal_projector.load_state_dict(projector)
    hf.model.language_model.load_state_dict(lm.base_model.state_dict())
    hf.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    hf.to(next(model.parameters()).dtype)
    image_processor = crop_image_processor(model.encoder)
    image_token = tokenizer.convert_ids_to_tokens(model.image_token_id)
    return hf, transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower.config["patch_size"],
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's class token
        image_token=image_token,
        chat_template=export_chat_template(processor, tokenizer, image_token),
    )


FORMAT = register_format(
    Format(
        name="llava",
        architectures=("LlavaForConditionalGeneration",),
        convert=convert_llava,
        reference=reference_llava,
        connector=("multi_modal_projector",),
        export=export_llava,
        bridges=tuple(PROJECTOR_ACTS),
    )
)
