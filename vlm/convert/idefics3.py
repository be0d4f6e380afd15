"""transformers' ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration``:
a SigLIP-shaped tower, pixel shuffle and one Linear without bias (vlm's ``linear`` bridge with
``merge``), any causal LM, and image splitting (vlm's ``split`` tiling). SmolVLM is the same
architecture; its processor differs (image_seq_len 64 or 81, its chat template, a video
processor: images only here).

Facts these rely on (checked in ``tests/test_convert_idefics3.py``): the connector's pixel
shuffle puts sub-patch ``(dh, dw)`` of a ``s x s`` block at channels ``dh*s*D + dw*D``, the order
of vlm's ``merge``, so ``proj.weight`` is the bridge's ``linear_1.weight`` unpermuted; vlm's
split tiles are ``Idefics3ImageProcessorPil``'s (its LANCZOS is PIL's; the torchvision
``Idefics3ImageProcessor`` resamples otherwise, a few levels of 255 apart).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import transformers
from torch import Tensor, nn

from vlm.bridges.linear import ProjectorConfig
from vlm.config import ModelConfig, ProcessorConfig
from vlm.convert.chat_template import export_chat_template
from vlm.convert.common import finish, load_exact, read_weights, refuse, select
from vlm.convert.reference import Size, llama_config
from vlm.convert.registry import Format, register_format
from vlm.convert.towers import load_siglip_tower, siglip_config, siglip_tower
from vlm.decoders.hf import HFDecoderConfig
from vlm.model import VisionLanguageModel, build_model
from vlm.schema import ConfigError
from vlm.tiling.none import NoTilingConfig
from vlm.tiling.split import FAKE, SplitConfig

log = logging.getLogger(__name__)

VISION_PREFIX = "model.vision_model."
PROJECTION = "model.connector.modality_projection.proj.weight"
#: transformers' resample codes (``PILImageResampling``) by vlm's ``processor.tiling.resample``.
RESAMPLE = {"lanczos": 1, "bicubic": 3}
#: The image processor's settings vlm's split tiling reproduces exactly, and their values.
FIXED = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}


# --- transformers -> vlm --------------------------------------------------------------------


def processor_files(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint's image processor settings (``preprocessor_config.json``, or the
    ``image_processor`` of ``processor_config.json`` where transformers 5 saves it) and its
    processor's own (``processor_config.json``: ``image_seq_len``); empty where absent."""
    image, processor = {}, {}
    if (path / "processor_config.json").is_file():
        processor = json.loads((path / "processor_config.json").read_text())
        image = processor.get("image_processor", {})
    if (path / "preprocessor_config.json").is_file():
        image = json.loads((path / "preprocessor_config.json").read_text())
    return image, processor


def split_config(path: Path, tile: int, tokens_per_tile: int) -> SplitConfig:
    """vlm's split tiling doing what the checkpoint's image processor does: ``size.longest_edge``
    (the global image only when ``do_image_splitting`` is off), tiles of
    ``max_image_size.longest_edge``, which must be the tower's ``image_size``.

    Raises:
        ConfigError: a setting vlm's tiling cannot reproduce (tiles of another size, no
            resizing or normalising, another resampling filter), or a processor whose
            ``image_seq_len`` is not the model's tokens per tile.
    """
    image, processor = processor_files(path)
    if not image:
        log.warning(
            "no image processor settings in %s (preprocessor_config.json or processor_config.json): "
            "images are split as Idefics3's and SmolVLM's processors ship, the longest edge at 4 "
            "tiles of %d px; set processor.tiling.longest_edge to change it",
            path,
            tile,
        )
        return SplitConfig(longest_edge=4 * tile)
    resample = {code: name for name, code in RESAMPLE.items()}.get(image.get("resample", 1))
    max_size = image.get("max_image_size", {}).get("longest_edge")
    seq_len = processor.get("image_seq_len", tokens_per_tile)
    problems = {
        f"max_image_size.longest_edge={max_size} (vlm's tiles are the tower's image_size, {tile})": (
            max_size != tile
        ),
        f"resample={image.get('resample')} (vlm's split resizes with LANCZOS (1) or BICUBIC (3))": (
            resample is None
        ),
        f"image_seq_len={seq_len} (the model gives {tokens_per_tile} per tile)": seq_len != tokens_per_tile,
        "size without longest_edge": "longest_edge" not in image.get("size", {}),
    } | {
        f"{key}={image[key]!r}": image[key] != value
        for key, value in FIXED.items()
        if key in image and not (isinstance(value, float) and math.isclose(image[key], value))
    }
    found = [k for k, v in problems.items() if v]
    if found:
        raise ConfigError(
            f"the image processor in {str(path)!r} does not convert to vlm's split tiling: "
            + ", ".join(found)
        )
    longest = image["size"]["longest_edge"]
    if not image.get("do_image_splitting", True):
        # Without splitting the processor squashes the resized image into one tile: vlm's split
        # at one tile's longest edge does it exactly when the processor resizes to that edge too.
        if longest != tile:
            log.warning(
                "do_image_splitting=false with size.longest_edge=%d: vlm resizes the longest edge "
                "straight to the tile (%d px) before squashing it, the processor to %d px first; "
                "the pixels differ slightly",
                longest,
                tile,
                longest,
            )
        longest = tile
    return SplitConfig(longest_edge=longest, resample=resample)


def text_prefixes(base: str) -> dict[str, str]:
    """Checkpoint names of the LM's tensors -> the causal LM's (base model ``base``)."""
    return {"model.text_model.": f"{base}.", "lm_head.": "lm_head."}


def convert_idefics3(path: Path, hf: Any) -> VisionLanguageModel:
    vision = hf.vision_config
    weights = read_weights(path)
    text = hf.text_config.to_dict()
    if "lm_head.weight" not in weights:  # saved tied: the head is the embedding
        text["tie_word_embeddings"] = True
    encoder = siglip_config(vision, path)
    grid = vision.image_size // vision.patch_size
    if grid % hf.scale_factor:
        raise ConfigError(
            f"scale_factor={hf.scale_factor} does not divide the tower's {grid} x {grid} patch grid"
        )
    tokens = (grid // hf.scale_factor) ** 2
    config = ModelConfig(
        encoder=encoder,
        bridge=ProjectorConfig(name="linear", bias=False, merge=hf.scale_factor),
        decoder=HFDecoderConfig(hf_config=text, freeze=True),
        image_token_id=hf.image_token_id,
        processor=ProcessorConfig(tiling=split_config(path, vision.image_size, tokens)),
    )
    model = build_model(config, empty=True)  # the checkpoint's tensors become its parameters
    load_siglip_tower(model.encoder, weights, prefix=VISION_PREFIX)
    load_exact(model.bridge, select(weights, {PROJECTION: "linear_1.weight"}), "connector")
    lm = model.decoder.lm
    load_exact(lm, select(weights, text_prefixes(lm.base_model_prefix)), "language model")
    return finish(model, weights)


def _reference(config_class: type, model_class: type, size: Size, image_token_id: int) -> nn.Module:
    """transformers' model at ``size``: a SigLIP tower, pixel shuffle by 2 (a tile of ``size.image``
    px), a Llama decoder."""
    vision = transformers.Idefics3VisionConfig(
        hidden_size=size.vision_width,
        intermediate_size=4 * size.vision_width,
        num_hidden_layers=size.vision_depth,
        num_attention_heads=size.vision_heads,
        image_size=size.image,
        patch_size=size.patch,
        initializer_range=size.init_range,
    )
    config = config_class(
        vision_config=vision.to_dict(),
        text_config=transformers.LlamaConfig(**llama_config(size)).to_dict(),
        image_token_id=image_token_id,
        scale_factor=2,
    )
    return model_class(config)


def reference_idefics3(size: Size, image_token_id: int) -> nn.Module:
    return _reference(
        transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration, size, image_token_id
    )


def reference_smolvlm(size: Size, image_token_id: int) -> nn.Module:
    return _reference(
        transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration, size, image_token_id
    )


def idefics3_inputs(inputs: dict[str, Tensor], image_token_id: int) -> dict[str, Tensor]:
    """vlm's batch in Idefics3's layout: each row's images (or tiles: whatever ``pixel_values``
    holds, each taking an equal run of placeholders) as ``(B, n, 3, H, W)``, rows with fewer
    padded with all-zero images, which the model drops."""
    out = {k: v for k, v in inputs.items() if k not in ("image_sizes", "image_index")}
    pixels = inputs.get("pixel_values")
    if pixels is None or pixels.ndim == 5:
        return out
    if "image_index" in inputs:
        pixels = pixels[inputs["image_index"]]
    per_row = (inputs["input_ids"] == image_token_id).sum(1)
    per_image = int(per_row.sum()) // len(pixels)
    counts = (per_row // per_image).tolist()
    layout = pixels.new_zeros(len(counts), max(counts), *pixels.shape[1:])
    for row, images in enumerate(pixels.split(counts)):
        layout[row, : len(images)] = images
    out["pixel_values"] = layout
    return out


# --- vlm -> transformers --------------------------------------------------------------------


def _tiles_at_most(split: Any) -> int:
    """The most tiles (the global one included) an image takes at ``split``'s longest edge."""
    side = math.ceil(split.longest_edge / split.tile_size)
    return side * side + 1 if side > 1 else 1


def _refuse_options(model: VisionLanguageModel, tokenizer: Any, target: str) -> None:
    """One ``ConfigError`` naming every part or option ``target`` has no counterpart for."""
    bridge, encoder = model.config.bridge, model.config.encoder
    tiling = model.config.processor.tiling
    vit = encoder.name == "vit"
    features = model.encoder.blocks_to_run - encoder.depth - 1 if vit else -1
    fake = tokenizer.convert_tokens_to_ids(FAKE)
    refuse(
        {
            f"encoder {encoder.name!r} (the tower is a SigLIP-shaped ViT, vlm's 'vit')": not vit,
            f"bridge {bridge.name!r} (the connector is one Linear, vlm's 'linear' with merge)": (
                bridge.name != "linear"
            ),
            "bridge.bias=true (the connector's Linear has no bias)": getattr(bridge, "bias", False),
            f"encoder.feature_layer={getattr(encoder, 'feature_layer', None)} (the features are the "
            "tower's last layer)": vit and features != -1,
            "encoder.final_norm=false (the features are last_hidden_state, after post_layernorm)": (
                vit and not encoder.final_norm
            ),
            f"processor.tiling {tiling.name!r} (Idefics3 splits images: tiling 'split')": (
                tiling.name != "split"
            ),
            "processor.tiling.markers=false (the processor marks every tile)": not getattr(
                tiling, "markers", True
            ),
            f"processor.tiling.max_tiles={getattr(tiling, 'max_tiles', None)} (no tile bound there; "
            "lower longest_edge instead)": tiling.name == "split"
            and tiling.max_tiles is not None
            and tiling.max_tiles < _tiles_at_most(model.tiling),
            f"a tokenizer without the {FAKE} token (the processor would add it, and vlm's image "
            "text would tokenize otherwise)": fake is None or fake == tokenizer.unk_token_id,
        },
        target,
    )


def _export(
    model: VisionLanguageModel, tokenizer: Any, kind: str
) -> tuple[transformers.PreTrainedModel, Any, dict[str, Any]]:
    """transformers' ``{kind}ForConditionalGeneration`` holding ``model``'s weights, its image
    processor (the PIL backend: vlm's tiles pixel for pixel) and its processor's arguments."""
    _refuse_options(model, tokenizer, f"{kind}ForConditionalGeneration")
    tower = siglip_tower(model.encoder)  # names the ViT options SigLIP lacks
    lm = model.decoder.lm
    text_config = copy.deepcopy(lm.config)
    text_config.tie_word_embeddings = False  # the head gets its own copy: exact, whatever the LM
    config = getattr(transformers, f"{kind}Config")(
        vision_config=getattr(transformers, f"{kind}VisionConfig")(**tower.config).to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=model.image_token_id,
        scale_factor=model.config.bridge.merge,
        tie_word_embeddings=False,
    )
    hf = getattr(transformers, f"{kind}ForConditionalGeneration")(config)
    hf.model.vision_model.load_state_dict(tower.state)
    hf.model.connector.modality_projection.proj.weight.data.copy_(model.bridge.linear_1.weight)
    hf.model.text_model.load_state_dict(lm.base_model.state_dict())
    hf.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    hf.to(next(model.parameters()).dtype)
    tiling, tile = model.config.processor.tiling, model.encoder.image_size
    settings = dict(
        do_image_splitting=True,  # at one tile's longest edge, the global image alone
        size={"longest_edge": model.tiling.longest_edge},
        max_image_size={"longest_edge": tile},
        resample=RESAMPLE[tiling.resample],
        image_mean=list(model.encoder.mean),
        image_std=list(model.encoder.std),
    )
    image_processor = getattr(transformers, f"{kind}ImageProcessorPil")(**settings)
    tokenizer = copy.deepcopy(tokenizer)  # the processor adds its special tokens where missing
    image_token = tokenizer.convert_ids_to_tokens(model.image_token_id)
    arguments = dict(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=model.tokens_per_image,
        # The template places the <image> markers, which the processor expands: checked as text
        # (an image one placeholder), whatever the tiling.
        chat_template=export_chat_template(
            dataclasses.replace(model.config.processor, tiling=NoTilingConfig()), tokenizer, image_token
        ),
    )
    return hf, settings, arguments


def export_idefics3(model: VisionLanguageModel, tokenizer: Any) -> tuple[nn.Module, Any]:
    """transformers' ``Idefics3ForConditionalGeneration`` holding ``model``'s weights, and its
    ``Idefics3Processor``: the split settings in its image processor, ``image_seq_len`` the
    model's tokens per tile, the chat template rendering conversations as vlm does
    (:mod:`vlm.convert.chat_template`).

    Takes a SigLIP-shaped ``vit`` (``class_token=false, pre_norm=false, patch_bias=true,
    final_norm=true, feature_layer=-1``; any size, activation ``gelu``, ``gelu_tanh`` or
    ``quick_gelu``, any normalisation), a ``linear`` bridge without bias (any ``merge`` that
    divides the patch grid), any transformers causal LM, and ``split`` tiling with markers;
    a model tiled to one tile's longest edge exports as the global image alone.

    Raises:
        ConfigError: naming each part or option Idefics3 has no counterpart for.
    """
    hf, _, arguments = _export(model, tokenizer, "Idefics3")
    return hf, transformers.Idefics3Processor(**arguments)


def export_smolvlm(model: VisionLanguageModel, tokenizer: Any) -> tuple[nn.Module, Any]:
    """:func:`export_idefics3` as ``SmolVLMForConditionalGeneration`` and ``SmolVLMProcessor``
    (with a video processor of the same sizes; it needs ``num2words``)."""
    hf, settings, arguments = _export(model, tokenizer, "SmolVLM")
    video = transformers.SmolVLMVideoProcessor(
        **{k: v for k, v in settings.items() if k != "do_image_splitting"}
    )
    return hf, transformers.SmolVLMProcessor(video_processor=video, **arguments)


FORMAT = register_format(
    Format(
        name="idefics3",
        architectures=("Idefics3ForConditionalGeneration",),
        convert=convert_idefics3,
        reference=reference_idefics3,
        connector=("connector",),
        hf_inputs=idefics3_inputs,
        export=export_idefics3,
        bridges=("linear",),
        tilings=("split",),
    )
)

SMOLVLM = register_format(
    Format(
        name="smolvlm",
        architectures=("SmolVLMForConditionalGeneration",),
        convert=convert_idefics3,
        reference=reference_smolvlm,
        connector=("connector",),
        hf_inputs=idefics3_inputs,
        export=export_smolvlm,
        bridges=("linear",),
        tilings=("split",),
    )
)
