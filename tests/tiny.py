"""Tiny configs and batches shared by the tests: whole models that run in milliseconds on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import xattn_bridge  # noqa: F401  (registers the test-only "test_xattn" bridge)

from vlm import (
    CLIPConfig,
    HFDecoderConfig,
    ModelConfig,
    PerceiverConfig,
    ProjectorConfig,
    QFormerConfig,
    ViTConfig,
)

VOCAB = 96
IMAGE_SIZE = 32

DECODERS = {
    "gpt2": dict(
        model_type="gpt2",
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=128,
        vocab_size=VOCAB,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama": dict(
        model_type="llama",
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "opt": dict(
        model_type="opt",
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        ffn_dim=64,
        word_embed_proj_dim=32,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "qwen2": dict(
        model_type="qwen2",
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
}

BRIDGES = {
    "linear": ProjectorConfig(name="linear"),
    "mlp2x_gelu": ProjectorConfig(name="mlp2x_gelu"),
    "qformer": QFormerConfig(num_queries=4, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    "perceiver": PerceiverConfig(
        num_latents=4,
        depth=1,
        num_heads=2,
        head_dim=16,
        xattn_heads=2,
        xattn_head_dim=16,
        mlp_ratio=2.0,
        xattn_mlp_ratio=2.0,
    ),
    "test_xattn": xattn_bridge.GatedXAttnConfig(),
}
CROSS_ATTENTION_BRIDGES = ("perceiver", "test_xattn")

TINY_CLIP = "vlm-tiny-ViT"
_TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def register_tiny_clip(directory: Path) -> str:
    """Adds a 2-layer CLIP architecture to open_clip's list of models; returns its name."""
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        path = Path(directory) / f"{TINY_CLIP}.json"
        path.write_text(json.dumps(_TINY_CLIP_CFG))
        open_clip.add_model_config(path)
    return TINY_CLIP


def vit_config(**overrides) -> ViTConfig:
    base = dict(image_size=IMAGE_SIZE, patch_size=8, width=32, depth=2, num_heads=2)
    return ViTConfig(**{**base, **overrides})


ENCODERS = {"vit": vit_config, "clip": lambda **overrides: CLIPConfig(model=TINY_CLIP, **overrides)}


def encoder_config(name: str, **overrides):
    return ENCODERS[name](**overrides)


def open_gates(model, value: float = 1.0) -> None:
    """Sets every tanh gate of a cross-attention bridge (zero at init) to ``value``, so that
    the images really steer the text."""
    with torch.no_grad():
        for name, p in model.bridge.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gate", "attn_gate", "mlp_gate"):
                p.fill_(value)


def model_config(encoder="vit", bridge="mlp2x_gelu", decoder="gpt2", **decoder_overrides) -> ModelConfig:
    enc = encoder if not isinstance(encoder, str) else encoder_config(encoder)
    return ModelConfig(
        encoder=enc,
        bridge=BRIDGES[bridge],
        decoder=HFDecoderConfig(hf_config=DECODERS[decoder], **decoder_overrides),
    )


def make_batch(model, images_per_row=(1, 2), seed=0, image_size=IMAGE_SIZE):
    """Random text with image placeholders, right-padded, and labels on the text after the images."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in images_per_row:
        ids: list[int] = []
        for _ in range(n):
            ids += torch.randint(3, VOCAB, (2,), generator=g).tolist()
            ids += [model.image_token_id] * model.tokens_per_image
        ids += torch.randint(3, VOCAB, (4,), generator=g).tolist()
        rows.append(ids)
    length = max(map(len, rows))
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
    labels = input_ids.clone()
    labels[:, :2] = -100  # a "prompt" that must not count
    pixels = torch.randn(sum(images_per_row), 3, image_size, image_size, generator=g)
    return dict(input_ids=input_ids, pixel_values=pixels, attention_mask=attention_mask, labels=labels)


def save_frozen_base(directory: Path, decoder: str = "gpt2") -> tuple[str, str]:
    """Writes a tiny transformers LM directory and a ViT ``.safetensors`` checkpoint.

    Returns ``(lm_dir, vit_checkpoint)``: the files a bridge-only checkpoint is loaded onto
    (``decoder.pretrained`` and ``encoder.checkpoint``).
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlm.encoders import ViTEncoder

    directory = Path(directory)
    options = dict(DECODERS[decoder])
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(options.pop("model_type"), **options))
    lm_dir = directory / "lm"
    lm.save_pretrained(lm_dir)
    vit_checkpoint = directory / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in ViTEncoder(vit_config()).state_dict().items()}, vit_checkpoint)
    return str(lm_dir), str(vit_checkpoint)


def based_config(lm_dir: str, vit_checkpoint: str, bridge: str = "mlp2x_gelu") -> ModelConfig:
    """A model config whose frozen base is rebuilt from files (see :func:`save_frozen_base`)."""
    return ModelConfig(
        encoder=vit_config(checkpoint=vit_checkpoint),
        bridge=BRIDGES[bridge],
        decoder=HFDecoderConfig(pretrained=lm_dir),
    )


def bare_lm(model):
    """A copy of ``model``'s HF LM with the same weights and none of vlm's hooks on its layers."""
    from transformers import AutoModelForCausalLM

    lm = model.decoder.lm
    copy = AutoModelForCausalLM.from_config(lm.config, attn_implementation=lm.config._attn_implementation)
    copy.load_state_dict(lm.state_dict())
    return copy.to(lm.dtype).eval()
