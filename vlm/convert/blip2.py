"""transformers' ``Blip2ForConditionalGeneration``: EVA ViT, Q-Former, language projection, OPT
(or any causal LM; T5's encoder-decoder is not a causal LM and is refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from vlm.bridges.qformer import QFormerConfig
from vlm.config import ModelConfig
from vlm.convert.common import (
    KeyMap,
    crop_image_processor,
    finish,
    load_exact,
    read_weights,
    refuse,
    select,
    write_into,
)
from vlm.convert.reference import SPECIAL_TOKEN_IDS, Size, vision_config
from vlm.convert.registry import Format, register_format
from vlm.convert.towers import eva_tower_map, vision_sizes, vit_config
from vlm.decoders.hf import HFDecoderConfig
from vlm.model import VisionLanguageModel, build_model
from vlm.schema import ConfigError

LANGUAGE = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head."}


def convert_blip2(path: Path, hf: Any) -> VisionLanguageModel:
    vision, qformer, text = hf.vision_config, hf.qformer_config, hf.text_config
    if getattr(text, "is_encoder_decoder", False):
        raise ConfigError(
            f"BLIP-2 with a {text.model_type!r} encoder-decoder LM is not supported; vlm's decoders "
            "are causal LMs (BLIP-2 OPT checkpoints convert)"
        )
    if qformer.hidden_act != "gelu":
        raise ConfigError(f"a Q-Former with hidden_act={qformer.hidden_act!r} is not supported (gelu only)")
    config = ModelConfig(
        # BLIP-2 feeds the Q-Former the last layer, class token included, after the final norm.
        encoder=vit_config(
            vision,
            path,
            feature_layer=-1,
            keep_class_token=True,
            final_norm=True,
            pre_norm=False,
            patch_bias=True,
        ),
        bridge=QFormerConfig(
            num_queries=hf.num_query_tokens,
            hidden_size=qformer.hidden_size,
            num_layers=qformer.num_hidden_layers,
            num_heads=qformer.num_attention_heads,
            intermediate_size=qformer.intermediate_size,
            cross_attention_frequency=qformer.cross_attention_frequency,
            layer_norm_eps=qformer.layer_norm_eps,
        ),
        decoder=HFDecoderConfig(hf_config=text.to_dict(), freeze=True),
        image_token_id=hf.image_token_id,
    )
    model = build_model(config, empty=True)  # the checkpoint's tensors become its parameters
    weights = read_weights(path)
    tower = select(weights, {"vision_model.": ""})
    load_exact(model.encoder, tower, "vision tower", eva_tower_map(vision.num_hidden_layers))
    # The Q-Former's text path (embeddings, ``intermediate`` / ``output``) never runs for BLIP-2's
    # LM-facing queries: it has no counterpart in vlm, and the map leaves it out.
    connector = select(weights, {p: p for p in ("qformer.", "query_tokens", "language_projection.")})
    load_exact(model.bridge, connector, "Q-Former", qformer_map(qformer.num_hidden_layers))
    load_exact(model.decoder.lm, select(weights, LANGUAGE), "language model")
    return finish(model, weights)


def qformer_map(depth: int) -> KeyMap:
    """transformers' Q-Former, query tokens and language projection (names under BLIP-2's model)
    <-> vlm's ``qformer`` bridge. Cross-attention layers come every ``cross_attention_frequency``
    layers: the table names them everywhere, and the layers without one have nothing to map."""
    renames = {
        "qformer.layernorm.": "embed_norm.",
        "query_tokens": "query_tokens",
        "language_projection.": "language_projection.",
    }
    fused = []
    for i in range(depth):
        src, dst = f"qformer.encoder.layer.{i}.", f"layers.{i}."
        self_attn, cross = f"{src}attention.attention.", f"{src}crossattention.attention."
        fused += [
            (tuple(f"{self_attn}{p}" for p in ("query", "key", "value")), f"{dst}self_attn.qkv"),
            ((f"{cross}key", f"{cross}value"), f"{dst}cross_attn.kv"),
        ]
        renames |= {
            f"{src}attention.output.dense.": f"{dst}self_attn.out.",
            f"{src}attention.output.LayerNorm.": f"{dst}self_norm.",
            f"{cross}query.": f"{dst}cross_attn.q.",
            f"{src}crossattention.output.dense.": f"{dst}cross_attn.out.",
            f"{src}crossattention.output.LayerNorm.": f"{dst}cross_norm.",
            f"{src}intermediate_query.dense.": f"{dst}ffn.0.",
            f"{src}output_query.dense.": f"{dst}ffn.2.",
            f"{src}output_query.LayerNorm.": f"{dst}ffn_norm.",
        }
    return KeyMap(renames, tuple(fused))


def reference_blip2(size: Size, image_token_id: int) -> nn.Module:
    """transformers' BLIP-2 at ``size``: a ViT, a Q-Former of ``size.queries`` queries and an OPT."""
    opt = transformers.OPTConfig(
        hidden_size=size.text_width,
        ffn_dim=size.text_ffn,
        num_hidden_layers=size.text_depth,
        num_attention_heads=size.text_heads,
        vocab_size=size.vocab,
        word_embed_proj_dim=size.text_width,
        init_std=size.init_range,
        **SPECIAL_TOKEN_IDS,
    )
    config = transformers.Blip2Config(
        vision_config=vision_config(size, initializer_range=size.init_range),
        qformer_config=dict(
            hidden_size=size.vision_width,
            intermediate_size=4 * size.vision_width,
            num_hidden_layers=size.connector_depth,
            num_attention_heads=size.vision_heads,
            encoder_hidden_size=size.vision_width,
            initializer_range=size.init_range,
        ),
        text_config=opt.to_dict(),
        num_query_tokens=size.queries,
        image_token_index=image_token_id,
        initializer_range=size.init_range,
    )
    model = transformers.Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # transformers starts the queries at zero: make them distinct
        model.query_tokens.normal_(0, 1)
    return model


def export_blip2(model: VisionLanguageModel, tokenizer: Any) -> tuple[nn.Module, Any]:
    """transformers' ``Blip2ForConditionalGeneration`` holding ``model``'s weights (a ``qformer``
    bridge on an EVA-like ViT and any causal LM), and its ``Blip2Processor``."""
    enc, bridge = model.config.encoder, model.config.bridge
    eva = {  # what BLIP-2's tower is: the last layer, class token included, after the final norm
        f"encoder {enc.name!r} (only vlm's ViT exports)": enc.name != "vit",
        f"encoder.stem={getattr(enc, 'stem', None)!r}": getattr(enc, "stem", "patch") != "patch",
        f"encoder.feature_layer={enc.feature_layer}": model.encoder.blocks_to_run != enc.depth,
        "encoder.keep_class_token=false": not enc.keep_class_token,
        "encoder.final_norm=false": not enc.final_norm,
        "encoder.pre_norm=true": enc.pre_norm,
        "encoder.patch_bias=false": not enc.patch_bias,
        f"encoder.act={enc.act!r}": enc.act != "gelu",
        f"processor.resize={model.config.processor.resize!r}": model.config.processor.resize != "crop",
    }
    refuse(eva, "Blip2ForConditionalGeneration")
    vision = vision_sizes(enc)  # BLIP-2's tower's act is gelu: checked above
    lm = model.decoder.lm
    config = transformers.Blip2Config(
        vision_config=vision,
        qformer_config=dict(
            hidden_size=bridge.hidden_size,
            num_hidden_layers=bridge.num_layers,
            num_attention_heads=bridge.num_heads,
            intermediate_size=bridge.intermediate_size,
            cross_attention_frequency=bridge.cross_attention_frequency,
            layer_norm_eps=bridge.layer_norm_eps,
            encoder_hidden_size=enc.width,
        ),
        text_config=lm.config.to_dict(),
        num_query_tokens=bridge.num_queries,
        image_token_index=model.image_token_id,
    )
    hf = transformers.Blip2ForConditionalGeneration(config)
    tower = eva_tower_map(enc.depth).to_transformers(model.encoder.state_dict())
    state = {f"vision_model.{k}": v for k, v in tower.items()}
    state |= qformer_map(bridge.num_layers).to_transformers(model.bridge.state_dict())
    state |= {f"language_model.{k}": v for k, v in lm.state_dict().items()}
    write_into(getattr(hf, "model", hf), state)  # newer transformers nest the parts in ``.model``
    hf.to(next(model.parameters()).dtype)
    # CLIP's image processor, not BLIP's: BLIP's squashes an image to a square, and vlm resizes
    # the short side and centre-crops. Blip2Processor loads whichever image processor it saved.
    image_processor = crop_image_processor(model.encoder)
    return hf, transformers.Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=bridge.num_queries
    )


FORMAT = register_format(
    Format(
        name="blip2",
        architectures=("Blip2ForConditionalGeneration",),
        convert=convert_blip2,
        reference=reference_blip2,
        # query_tokens is a Parameter of the model itself: it trains with the Q-Former.
        connector=("qformer", "language_projection", "query_tokens"),
        export=export_blip2,
        bridges=("qformer",),
    )
)
