"""transformers' ``IdeficsForVisionText2Text`` (Flamingo): CLIP tower, Perceiver resampler, and
a Llama decoder with gated cross-attention before every ``cross_layer_interval``-th layer.

The decoder becomes a plain transformers ``LlamaForCausalLM`` (IDEFICS's decoder layers are
Llama's); the gated layers become vlm's perceiver bridge blocks with IDEFICS's RMSNorm and
SwiGLU MLP. IDEFICS's decoupled extra embeddings (``additional_vocab_size``) are appended to
the embedding and output tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn

from vlm.bridges.perceiver import PerceiverConfig
from vlm.config import ModelConfig
from vlm.convert.common import (
    KeyMap,
    finish,
    image_token_from_tokenizer,
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


def convert_idefics(path: Path, hf: Any) -> VisionLanguageModel:
    vision, perceiver = hf.vision_config, hf.perceiver_config
    unsupported = {
        "use_resampler=False": not hf.use_resampler,
        "qk_layer_norms=True": hf.qk_layer_norms,
        "qk_layer_norms_perceiver=True": perceiver.qk_layer_norms_perceiver,
        f"alpha_type={hf.alpha_type!r}": hf.alpha_type != "float",
        f"hidden_act={hf.hidden_act!r}": hf.hidden_act != "silu",
    }
    if any(unsupported.values()):
        raise ConfigError(
            "this IDEFICS checkpoint uses "
            + ", ".join(k for k, v in unsupported.items() if v)
            + ", which vlm does not convert"
        )
    heads = hf.num_attention_heads
    config = ModelConfig(
        # IDEFICS resamples the last layer's tokens, class token included, without the final norm.
        encoder=vit_config(vision, path, feature_layer=-1, keep_class_token=True),
        bridge=PerceiverConfig(
            num_latents=perceiver.resampler_n_latents,
            depth=perceiver.resampler_depth,
            num_heads=perceiver.resampler_n_heads,
            head_dim=perceiver.resampler_head_dim,
            mlp_ratio=4.0,
            mlp_act="relu",
            cross_attention_interval=hf.cross_layer_interval,
            placement="first",
            xattn_heads=heads,
            xattn_head_dim=hf.hidden_size // heads,
            xattn_mlp_ratio=hf.intermediate_size / hf.hidden_size,
            xattn_norm="rmsnorm",
            xattn_norm_eps=hf.rms_norm_eps,
            xattn_mlp="swiglu",
        ),
        decoder=HFDecoderConfig(hf_config=_llama_config(hf), freeze=True),
        image_token_id=image_token_from_tokenizer(path),
    )
    model = build_model(config, empty=True)  # the checkpoint's tensors become its parameters
    weights = read_weights(path)
    tower = select(weights, {"model.vision_model.": ""})
    load_exact(model.encoder, tower, "vision tower", clip_tower_map(vision.num_hidden_layers))
    parts = select(weights, {p: p for p in ("model.perceiver_resampler.", "model.gated_cross_attn_layers.")})
    gated = hf.num_hidden_layers // hf.cross_layer_interval
    keymap = bridge_map(perceiver.resampler_depth, gated, hf.cross_layer_interval)
    load_exact(model.bridge, parts, "resampler and gated cross-attention", keymap)
    load_exact(model.decoder.lm, _language_state(weights), "language model")
    return finish(model, weights)


def _llama_config(hf: Any) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": hf.vocab_size + hf.additional_vocab_size,
        "hidden_size": hf.hidden_size,
        "intermediate_size": hf.intermediate_size,
        "num_hidden_layers": hf.num_hidden_layers,
        "num_attention_heads": hf.num_attention_heads,
        "num_key_value_heads": hf.num_attention_heads,
        "hidden_act": hf.hidden_act,
        "max_position_embeddings": hf.max_position_embeddings,
        "rms_norm_eps": hf.rms_norm_eps,
        "rope_parameters": dict(hf.rope_parameters),
        "tie_word_embeddings": False,
        "pad_token_id": hf.pad_token_id,
        "bos_token_id": hf.bos_token_id,
        "eos_token_id": hf.eos_token_id,
    }


def _language_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    w = select(weights, {"model.embed_tokens.": "embed.", "lm_head.": "head.", "model.": "model."})
    w = {
        k: v
        for k, v in w.items()
        if not k.startswith(
            ("model.vision_model.", "model.perceiver_resampler.", "model.gated_cross_attn_layers.")
        )
    }
    # Decoupled tables: the extra tokens' rows follow the main vocabulary's.
    w["model.embed_tokens.weight"] = _cat(
        w.pop("embed.weight"), w.pop("embed.additional_embedding.weight", None)
    )
    w["lm_head.weight"] = _cat(w.pop("head.weight"), w.pop("head.additional_fc.weight", None))
    return w


def _cat(main: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    return main if extra is None else torch.cat([main, extra])


def bridge_map(resampler_depth: int, gated_layers: int, interval: int) -> KeyMap:
    """IDEFICS's resampler and gated cross-attention layers (names under the model) <-> vlm's
    perceiver bridge. IDEFICS's j-th gated layer runs before decoder layer ``j * interval``:
    it is vlm's block of that layer."""
    renames = {
        "model.perceiver_resampler.latents": "resampler.latents",
        "model.perceiver_resampler.layer_norm.": "resampler.norm.",
    }
    fused = []
    for i in range(resampler_depth):
        src, dst = f"model.perceiver_resampler.blocks.{i}.", f"resampler.layers.{i}."
        fused.append(((f"{src}0.k_proj", f"{src}0.v_proj"), f"{dst}attn.kv"))
        renames |= {
            f"{src}0.context_layer_norm.": f"{dst}norm_media.",
            f"{src}0.latents_layer_norm.": f"{dst}norm_latents.",
            f"{src}0.q_proj.": f"{dst}attn.q.",
            f"{src}0.output_proj.": f"{dst}attn.out.",
            f"{src}1.ln.": f"{dst}mlp.0.",
            f"{src}1.fc.": f"{dst}mlp.1.",
            f"{src}1.c_proj.": f"{dst}mlp.3.",
        }
    for j in range(gated_layers):
        src, dst = f"model.gated_cross_attn_layers.{j}.", f"blocks.{j * interval}."
        fused.append(((f"{src}cross_attn.k_proj", f"{src}cross_attn.v_proj"), f"{dst}attn.kv"))
        renames |= {
            f"{src}alpha_cross_attn": f"{dst}attn_gate",
            f"{src}alpha_dense": f"{dst}mlp_gate",
            f"{src}input_layernorm.": f"{dst}attn_norm.",
            f"{src}cross_attn.q_proj.": f"{dst}attn.q.",
            f"{src}cross_attn.o_proj.": f"{dst}attn.out.",
            f"{src}post_attention_layernorm.": f"{dst}mlp.0.",
            f"{src}mlp.": f"{dst}mlp.1.",
        }
    return KeyMap(renames, tuple(fused))


def reference_idefics(size: Size, image_token_id: int) -> nn.Module:
    """transformers' IDEFICS at ``size``: a CLIP tower, a resampler of ``size.queries`` latents
    and a Llama with a gated cross-attention layer every quarter of its depth. (Its image token
    is the tokenizer's: ``image_token_id`` has no place in the config.)"""
    vision = vision_config(size)
    vision["embed_dim"] = vision.pop("hidden_size")
    llama = llama_config(size)
    config = transformers.IdeficsConfig(
        **{k: v for k, v in llama.items() if k != "num_key_value_heads"},
        cross_layer_interval=max(size.text_depth // 4, 1),
        use_resampler=True,
        alpha_initializer="ones",  # open gates: the images reach the text
        vision_config=vision,
        perceiver_config=dict(
            resampler_n_latents=size.queries,
            resampler_depth=size.connector_depth,
            resampler_n_heads=size.vision_heads,
            resampler_head_dim=size.vision_width // size.vision_heads,
        ),
    )
    return transformers.IdeficsForVisionText2Text(config)


def idefics_inputs(inputs: dict[str, Tensor], image_token_id: int) -> dict[str, Tensor]:
    """vlm's layout in IDEFICS's: pixels ``(B, n_img, 3, H, W)`` (every row holds ``n_img``
    images) and ``image_attention_mask`` ``(B, T, n_img)``, one-hot the latest image each token
    follows (none before the first)."""
    out = dict(inputs)
    if inputs.get("pixel_values") is None:
        return out
    ids = inputs["input_ids"]
    is_image = ids == image_token_id
    per_row = is_image.sum(1)
    if (per_row != per_row[0]).any():
        raise ValueError(f"IDEFICS's layout needs as many images in every row; got {per_row.tolist()}")
    n_img = int(per_row[0])
    latest = is_image.long().cumsum(1)  # 0 before the first image, then 1, 2, ...
    out["pixel_values"] = inputs["pixel_values"].unflatten(0, (ids.shape[0], n_img))
    out["image_attention_mask"] = torch.nn.functional.one_hot(latest, n_img + 1)[..., 1:]
    return out


def export_idefics(model: VisionLanguageModel, tokenizer: Any) -> tuple[nn.Module, Any]:
    """transformers' ``IdeficsForVisionText2Text`` holding ``model``'s weights (a ``perceiver``
    bridge with IDEFICS's options on a Llama decoder), and its ``IdeficsProcessor``."""
    bridge, lm = model.config.bridge, model.decoder.lm
    tower = clip_tower(model.encoder)
    text = lm.config.get_text_config()
    heads, width, depth, k = (
        text.num_attention_heads,
        text.hidden_size,
        text.num_hidden_layers,
        bridge.cross_attention_interval,
    )
    refuse(
        {
            f"decoder model_type={text.model_type!r} (IDEFICS's decoder is Llama's)": text.model_type
            != "llama",
            "grouped-query attention (num_key_value_heads != num_attention_heads)": (
                getattr(text, "num_key_value_heads", heads) != heads
            ),
            f"encoder.feature_layer={tower.feature_layer} (IDEFICS resamples the last layer)": (
                tower.feature_layer != -1
            ),
            "encoder.keep_class_token=false": not tower.keep_class_token,
            f"bridge.placement={bridge.placement!r}": bridge.placement != "first",
            f"bridge.cross_attention_interval={k} (not a divisor of the LM's {depth} layers)": depth % k != 0,
            f"bridge.mlp_act={bridge.mlp_act!r}": bridge.mlp_act != "relu",
            f"bridge.mlp_ratio={bridge.mlp_ratio}": bridge.mlp_ratio != 4.0,
            f"bridge.xattn_norm={bridge.xattn_norm!r}": bridge.xattn_norm != "rmsnorm",
            f"bridge.xattn_mlp={bridge.xattn_mlp!r}": bridge.xattn_mlp != "swiglu",
            f"bridge.xattn_heads={bridge.xattn_heads} (IDEFICS's are the LM's)": bridge.xattn_heads != heads,
            f"bridge.xattn_head_dim={bridge.xattn_head_dim}": bridge.xattn_head_dim * heads != width,
            f"bridge.xattn_mlp_ratio={bridge.xattn_mlp_ratio}": (
                round(width * bridge.xattn_mlp_ratio) != text.intermediate_size
            ),
            f"bridge.xattn_norm_eps={bridge.xattn_norm_eps}": bridge.xattn_norm_eps != text.rms_norm_eps,
            f"processor.resize={model.config.processor.resize!r}": model.config.processor.resize != "crop",
        },
        "IdeficsForVisionText2Text",
    )
    vision = dict(tower.config)
    vision["embed_dim"] = vision.pop("hidden_size")
    llama = {
        key: getattr(text, key)
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "hidden_act",
            "rms_norm_eps",
            "max_position_embeddings",
            "rope_parameters",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
        )
    }
    config = transformers.IdeficsConfig(
        **llama,
        additional_vocab_size=0,
        tie_word_embeddings=False,
        cross_layer_interval=k,
        use_resampler=True,
        vision_config=vision,
        perceiver_config=dict(
            resampler_n_latents=bridge.num_latents,
            resampler_depth=bridge.depth,
            resampler_n_heads=bridge.num_heads,
            resampler_head_dim=bridge.head_dim,
        ),
    )
    hf = transformers.IdeficsForVisionText2Text(config)
    state = {f"model.vision_model.{key}": v for key, v in tower.state.items()}
    state |= bridge_map(bridge.depth, depth // k, k).to_transformers(model.bridge.state_dict())
    state |= lm.state_dict()  # the LM keeps its names: IDEFICS's decoder is Llama's
    write_into(hf, state)
    hf.to(next(model.parameters()).dtype)
    image_processor = transformers.IdeficsImageProcessor(
        image_size=model.encoder.image_size,
        image_mean=list(model.encoder.mean),
        image_std=list(model.encoder.std),
    )
    return hf, transformers.IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer)


FORMAT = register_format(
    Format(
        name="idefics",
        architectures=("IdeficsForVisionText2Text",),
        convert=convert_idefics,
        reference=reference_idefics,
        connector=("perceiver_resampler", "gated_cross_attn_layers"),
        hf_inputs=idefics_inputs,
        export=export_idefics,
        bridges=("perceiver",),
    )
)
