"""transformers' ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT: a CLIP tower) and
``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision: a SigLIP tower, images only): the
2-layer projector of LLaVA-1.5 on AnyRes tiles, whose unpadded token grid ends each row with a
learned ``image_newline`` (vlm's ``anyres`` tiling, :mod:`vlm.tiling.anyres`).

The tiling is read from the checkpoint's own files (``image_grid_pinpoints`` of its image
processor, else of ``config.json``; OneVision's ``vision_aspect_ratio`` ``anyres_max_N``), never
from the classes' defaults. vlm counts each image's placeholders from the model's features, as
transformers' processors do for these checkpoints (LLaVA-NeXT's with
``num_additional_image_tokens = 1``: the CLIP class token its ``"default"`` strategy drops).

Images only, every image tiled: OneVision's videos are not converted, and where transformers'
OneVision gets several images in one prompt (``batch_num_images`` above 1) it takes each image's
base tile alone, which vlm's tiling does not.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn

from vlm.bridges.linear import ProjectorConfig
from vlm.config import ModelConfig, ProcessorConfig
from vlm.convert.chat_template import export_chat_template
from vlm.convert.common import finish, load_exact, read_weights, refuse, select, write_into
from vlm.convert.llava import PROJECTOR_ACTS, language_prefixes, projector_state, read_projector
from vlm.convert.reference import Size, llama_config, vision_config
from vlm.convert.registry import Format, register_format
from vlm.convert.towers import (
    clip_tower,
    clip_tower_map,
    load_siglip_tower,
    siglip_config,
    siglip_tower,
    vit_config,
)
from vlm.decoders.hf import HFDecoderConfig
from vlm.model import VisionLanguageModel, build_model
from vlm.registry import TILINGS
from vlm.schema import ConfigError
from vlm.tiling.anyres import AnyResConfig

log = logging.getLogger(__name__)

#: Where the vision tower's tensors sit: the hub's layout (the tower's own ``vision_model``, or
#: transformers 5's save without it) and transformers 5's in-memory ``model.*`` layout.
TOWER_PREFIXES = (
    "vision_tower.vision_model.",
    "vision_tower.",
    "model.vision_tower.vision_model.",
    "model.vision_tower.",
)
NEWLINE = {"model.image_newline": "image_newline", "image_newline": "image_newline"}
BICUBIC = 3  # PIL's number for it, as image processor files store ``resample``
#: The reference models' tile grids (rows x cols): wide, tall and square, 1x1 to 3x3 tiles.
REFERENCE_GRIDS = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (3, 3))


# --- reading a checkpoint --------------------------------------------------------------------


def processor_files(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The image processor's and the processor's settings saved beside a checkpoint: the hub's
    ``preprocessor_config.json`` and ``processor_config.json``, or transformers 5's single
    ``processor_config.json`` (the image processor nested in it). Empty where there are none."""
    image, processor = {}, {}
    if (path / "preprocessor_config.json").is_file():
        image = json.loads((path / "preprocessor_config.json").read_text())
    if (path / "processor_config.json").is_file():
        processor = json.loads((path / "processor_config.json").read_text())
        image = {**image, **processor.get("image_processor", {})}
    return image, processor


def max_tiles_features(aspect: str) -> int:
    """OneVision's ``vision_aspect_ratio`` ``"anyres_max_N"`` -> ``N``."""
    match = re.fullmatch(r"anyres_max_(\d+)", aspect)
    if match is None:
        raise ConfigError(f"vision_aspect_ratio={aspect!r} is not supported; vlm reads 'anyres_max_N'")
    return int(match.group(1))


def anyres_config(path: Path, hf: Any, tile: int) -> AnyResConfig:
    """The checkpoint's AnyRes tiling: its image processor's pinpoints (those of ``config.json``,
    which the model packs its features by, when no processor was saved), each checked against
    the other and the tile size against the tower's."""
    image, processor = processor_files(path)
    pinpoints = [list(p) for p in image.get("image_grid_pinpoints") or hf.image_grid_pinpoints]
    if hf.image_grid_pinpoints is not None and pinpoints != [list(p) for p in hf.image_grid_pinpoints]:
        raise ConfigError(
            f"the image processor's image_grid_pinpoints {pinpoints} differ from config.json's "
            f"{hf.image_grid_pinpoints}: the model would arrange tiles the processor did not cut"
        )
    crop = image.get("crop_size") or image.get("size") or {}
    side = crop.get("height", crop.get("shortest_edge", tile)) if isinstance(crop, dict) else crop
    if side != tile:
        raise ConfigError(
            f"the image processor cuts {side}-pixel tiles but the vision tower takes {tile} pixels"
        )
    if image.get("resample", BICUBIC) != BICUBIC:
        raise ConfigError(
            f"the image processor resamples with resample={image['resample']}; vlm's AnyRes tiles are "
            f"resized bicubic (resample={BICUBIC}), as LLaVA-NeXT's and OneVision's processors do"
        )
    limit = None
    if hf.model_type == "llava_onevision":
        limit = max_tiles_features(hf.vision_aspect_ratio)
        theirs = processor.get("vision_aspect_ratio", hf.vision_aspect_ratio)
        if theirs != hf.vision_aspect_ratio:
            raise ConfigError(
                f"processor_config.json's vision_aspect_ratio={theirs!r} differs from config.json's "
                f"{hf.vision_aspect_ratio!r}"
            )
    return AnyResConfig(pinpoints=pinpoints, max_tiles_features=limit)


def tower_prefix(weights: dict[str, Tensor]) -> str:
    """The prefix the vision tower's tensors carry in this checkpoint (the longest that fits)."""
    for prefix in sorted(TOWER_PREFIXES, key=len, reverse=True):
        if f"{prefix}embeddings.patch_embedding.weight" in weights:
            return prefix
    raise ConfigError(
        f"no vision tower in the checkpoint: expected tensors under {' or '.join(TOWER_PREFIXES)}"
    )


def check_counts(path: Path, hf: Any, model: VisionLanguageModel) -> None:
    """Warns when transformers' processor, built from the checkpoint's files, would count other
    placeholders per tile than the model's features (vlm counts the features)."""
    _, processor = processor_files(path)
    if hf.model_type == "llava_onevision":
        theirs = processor.get("num_image_tokens")
        if theirs is None:
            return
        theirs -= processor.get("vision_feature_select_strategy") == "default"
    else:
        patch = processor.get("patch_size")
        if patch is None:
            return
        theirs = (model.encoder.image_size // patch) ** 2 + processor.get("num_additional_image_tokens", 0)
        theirs -= processor.get("vision_feature_select_strategy") == "default"
    if theirs != model.tokens_per_image:
        log.warning(
            "%s's processor counts %d placeholders for a tile whose features are %d tokens "
            "(num_additional_image_tokens / num_image_tokens); vlm's processor counts %d",
            path,
            theirs,
            model.tokens_per_image,
            model.tokens_per_image,
        )


def convert_anyres(path: Path, hf: Any) -> VisionLanguageModel:
    """LLaVA-NeXT and LLaVA-OneVision checkpoints: a CLIP tower whose class token the
    ``"default"`` strategy drops, or a SigLIP tower whose ``"full"`` features are all patches."""
    vision, layer, strategy = hf.vision_config, hf.vision_feature_layer, hf.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise ConfigError(
            f"vision_feature_layer={layer} (several layers) is not supported; vlm takes one layer"
        )
    towers = {
        "clip_vision_model": (
            "default",
            "'full' keeps the class token, which AnyRes' token grid has no place for",
        ),
        "siglip_vision_model": ("full", "'default' drops a patch of a tower without a class token"),
    }
    if vision.model_type not in towers:
        raise ConfigError(
            f"a {vision.model_type!r} vision tower is not supported; vlm converts {', '.join(towers)}"
        )
    wanted, why = towers[vision.model_type]
    if strategy != wanted:
        raise ConfigError(
            f"vision_feature_select_strategy={strategy!r} with a {vision.model_type} tower is not "
            f"supported: {why}"
        )
    weights = read_weights(path)
    bridge, projector = read_projector(weights, hf)
    clip = vision.model_type == "clip_vision_model"
    if clip:
        encoder = vit_config(vision, path, feature_layer=layer, keep_class_token=False)
    else:
        encoder = siglip_config(vision, path, feature_layer=layer, final_norm=False)
    text = hf.text_config
    config = ModelConfig(
        encoder=encoder,
        bridge=ProjectorConfig(name=bridge, bias=getattr(hf, "multimodal_projector_bias", True)),
        decoder=HFDecoderConfig(hf_config=text.to_dict(), freeze=True),
        image_token_id=hf.image_token_id,
        processor=ProcessorConfig(
            max_length=getattr(text, "max_position_embeddings", 4096),  # an image can take thousands
            tiling=anyres_config(path, hf, vision.image_size),
        ),
    )
    model = build_model(config, empty=True)  # the checkpoint's tensors become its parameters
    prefix = tower_prefix(weights)
    if clip:
        tower = select(weights, {prefix: ""})
        load_exact(model.encoder, tower, "vision tower", clip_tower_map(vision.num_hidden_layers))
    else:
        load_siglip_tower(model.encoder, weights, prefix)
    load_exact(model.bridge, projector, "projector")
    load_exact(model.tiling, select(weights, NEWLINE), "image newline")
    lm = model.decoder.lm
    load_exact(lm, select(weights, language_prefixes(lm.base_model_prefix)), "language model")
    check_counts(path, hf, model)
    return finish(model, weights)


def tiles_layout(inputs: dict[str, Tensor], image_token_id: int) -> dict[str, Tensor]:
    """vlm's tiles (``(N_tiles, 3, H, W)`` with ``image_sizes``) as transformers' processor lays
    them out, ``(N_img, tiles, 3, H, W)``, when every image has the same size (the probes'
    batches; beam search expands it row by row); otherwise as they are, which transformers'
    forward also takes."""
    out = dict(inputs)
    pixels, sizes = inputs["pixel_values"], inputs.get("image_sizes")
    if sizes is None or pixels.dim() != 4 or len(pixels) % len(sizes) or (sizes != sizes[0]).any():
        return out
    out["pixel_values"] = pixels.view(len(sizes), -1, *pixels.shape[1:])
    return out


# --- reference models ------------------------------------------------------------------------


def reference_pinpoints(tile: int) -> list[list[int]]:
    return [[rows * tile, cols * tile] for rows, cols in REFERENCE_GRIDS]


def reference_next(size: Size, image_token_id: int, **options: Any) -> nn.Module:
    """transformers' LLaVA-NeXT at ``size``: a CLIP tower, a Llama decoder, pinpoints of 1x2 to
    3x3 tiles (``options`` override config keys)."""
    config = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(
            **vision_config(size, initializer_factor=size.init_range / 0.02)
        ).to_dict(),
        text_config=transformers.LlamaConfig(**llama_config(size)).to_dict(),
        image_token_id=image_token_id,
        image_grid_pinpoints=reference_pinpoints(size.image),
        initializer_range=size.init_range,
        **options,
    )
    return transformers.LlavaNextForConditionalGeneration(config)


def reference_onevision(size: Size, image_token_id: int, **options: Any) -> nn.Module:
    """transformers' LLaVA-OneVision at ``size``: a SigLIP tower without its head, a Llama
    decoder, the pinpoints of :func:`reference_next` and ``anyres_max_2`` (larger grids shrink)."""
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(**vision_config(size), vision_use_head=False).to_dict(),
        text_config=transformers.LlamaConfig(**llama_config(size)).to_dict(),
        image_token_id=image_token_id,
        image_grid_pinpoints=reference_pinpoints(size.image),
        vision_aspect_ratio="anyres_max_2",
        initializer_range=size.init_range,
        **options,
    )
    return transformers.LlavaOnevisionForConditionalGeneration(config)


# --- export ----------------------------------------------------------------------------------


def has_class_token(model: VisionLanguageModel) -> bool:
    """CLIP-shaped towers (vlm's ViT with a class token, open_clip's ViTs) go to LLaVA-NeXT;
    SigLIP-shaped ones (no class token) to OneVision."""
    return getattr(model.config.encoder, "class_token", True)


def _common(model: VisionLanguageModel, target: str, problems: dict[str, bool]) -> dict[str, Any]:
    """What both exports share: the refusals, and the config keys of the projector, the text
    model (untied: the head keeps its own exact copy, as LLaVA's export does) and the tiles."""
    bridge, tiling = model.config.bridge, model.config.processor.tiling
    refuse(
        {
            f"bridge {bridge.name!r}": bridge.name not in PROJECTOR_ACTS,
            f"bridge.merge={getattr(bridge, 'merge', 1)}": getattr(bridge, "merge", 1) != 1,
            "processor.tiling.newline=false": not tiling.newline,
        }
        | problems,
        target,
    )
    text_config = copy.deepcopy(model.decoder.lm.config)
    text_config.tie_word_embeddings = False
    return dict(
        text_config=text_config,
        image_token_id=model.image_token_id,
        projector_hidden_act=PROJECTOR_ACTS[bridge.name],
        multimodal_projector_bias=bridge.bias,
        image_grid_pinpoints=[list(p) for p in model.tiling.pinpoints],  # after max_tiles
        tie_word_embeddings=False,
    )


def _write(hf: nn.Module, model: VisionLanguageModel, tower_state: dict[str, Tensor]) -> nn.Module:
    """``model``'s weights into transformers' ``hf``, in ``model``'s dtype."""
    write_into(getattr(hf.model.vision_tower, "vision_model", hf.model.vision_tower), tower_state)
    hf.model.multi_modal_projector.load_state_dict(projector_state(model))
    lm = model.decoder.lm
    hf.model.language_model.load_state_dict(lm.base_model.state_dict())
    hf.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    with torch.no_grad():
        hf.model.image_newline.copy_(model.tiling.image_newline)
    return hf.to(next(model.parameters()).dtype)


def chat_template(model: VisionLanguageModel, tokenizer: Any, image_token: str) -> str:
    """The processor's chat template (:func:`export_chat_template`): it renders the text around
    ``<image>`` markers, which the processor expands, so the tiling plays no part in it."""
    untiled = dataclasses.replace(model.config.processor, tiling=TILINGS.parse({"name": "none"}))
    return export_chat_template(untiled, tokenizer, image_token)


def _image_processor_options(model: VisionLanguageModel) -> dict[str, Any]:
    return dict(
        image_grid_pinpoints=[list(p) for p in model.tiling.pinpoints],
        image_mean=list(model.encoder.mean),
        image_std=list(model.encoder.std),
    )


def export_next(model: VisionLanguageModel, tokenizer: Any) -> tuple[nn.Module, Any]:
    """transformers' ``LlavaNextForConditionalGeneration`` holding ``model``'s weights (a tower
    with a class token, dropped: ``"default"``), and its ``LlavaNextProcessor`` (the pinpoints,
    ``num_additional_image_tokens = 1``, the chat template of :mod:`vlm.convert.chat_template`)."""
    tower = clip_tower(model.encoder)
    tiling = model.config.processor.tiling
    target = "LlavaNextForConditionalGeneration"
    options = _common(
        model,
        target,
        {
            "encoder.keep_class_token=true (AnyRes' token grid)": tower.keep_class_token,
            f"processor.tiling.max_tiles_features={tiling.max_tiles_features} (OneVision's, "
            "with a tower without a class token)": tiling.max_tiles_features is not None,
        },
    )
    config = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(**tower.config).to_dict(),
        vision_feature_layer=tower.feature_layer,
        vision_feature_select_strategy="default",
        **options,
    )
    hf = _write(transformers.LlavaNextForConditionalGeneration(config), model, tower.state)
    side = model.encoder.image_size
    image_token = tokenizer.convert_ids_to_tokens(model.image_token_id)
    return hf, transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessor(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            **_image_processor_options(model),
        ),
        tokenizer=tokenizer,
        patch_size=tower.config["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the class token the strategy drops
        image_token=image_token,
        chat_template=chat_template(model, tokenizer, image_token),
    )


def export_onevision(model: VisionLanguageModel, tokenizer: Any) -> tuple[nn.Module, Any]:
    """transformers' ``LlavaOnevisionForConditionalGeneration`` holding ``model``'s weights (a
    SigLIP-shaped tower, ``"full"`` features), and its ``LlavaOnevisionProcessor``.
    ``max_tiles_features`` is ``anyres_max_N``; without it, ``N`` is the largest grid's tiles,
    which never shrinks a grid, as vlm does not."""
    tower = siglip_tower(model.encoder)
    tiling = model.tiling
    options = _common(
        model,
        "LlavaOnevisionForConditionalGeneration",
        {"encoder.final_norm=true (OneVision's features skip SigLIP's post-norm)": tower.post_norm},
    )
    side = model.encoder.image_size
    limit = tiling.config.max_tiles_features
    if limit is None:
        limit = max((h // side) * (w // side) for h, w in tiling.pinpoints)
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(**tower.config, vision_use_head=False).to_dict(),
        vision_feature_layer=tower.feature_layer,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{limit}",
        **options,
    )
    hf = _write(transformers.LlavaOnevisionForConditionalGeneration(config), model, tower.state)
    image_token = tokenizer.convert_ids_to_tokens(model.image_token_id)
    size = {"height": side, "width": side}
    return hf, transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(
            size=size, **_image_processor_options(model)
        ),
        tokenizer=tokenizer,
        video_processor=transformers.LlavaOnevisionVideoProcessor(
            size=size, image_mean=list(model.encoder.mean), image_std=list(model.encoder.std)
        ),
        num_image_tokens=model.tokens_per_image,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=config.vision_aspect_ratio,
        image_token=image_token,
        chat_template=chat_template(model, tokenizer, image_token),
    )


NEXT = register_format(
    Format(
        name="llava_next",
        architectures=("LlavaNextForConditionalGeneration",),
        convert=convert_anyres,
        reference=reference_next,
        connector=("multi_modal_projector",),
        hf_inputs=tiles_layout,
        export=export_next,
        bridges=tuple(PROJECTOR_ACTS),
        tilings=("anyres",),
        takes=has_class_token,
    )
)
ONEVISION = register_format(
    Format(
        name="llava_onevision",
        architectures=("LlavaOnevisionForConditionalGeneration",),
        convert=convert_anyres,
        reference=reference_onevision,
        connector=("multi_modal_projector",),
        hf_inputs=tiles_layout,
        export=export_onevision,
        bridges=tuple(PROJECTOR_ACTS),
        tilings=("anyres",),
        takes=lambda model: not has_class_token(model),
    )
)
