"""Saved tiny models with a real tokenizer, for the tests that load a model directory."""

from pathlib import Path

import tiny
import torch

from vlm import build_model
from vlm.data.shapes import tokenizer as shapes_tokenizer
from vlm.weights import save_pretrained


def save_tiny_model(directory: Path, bridge: str = "mlp2x_gelu", decoder: str = "llama", **processor) -> Path:
    """A randomly initialised model over the shapes tokenizer, saved with it. Its LM weights are
    larger than transformers' initialisation, so that it says varied things and its answers
    depend on the prompt (not one token repeated)."""
    tok = shapes_tokenizer()
    config = tiny.model_config("vit", bridge, decoder)
    config.decoder.hf_config = {
        **config.decoder.hf_config,
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    config.image_token_id = tok.convert_tokens_to_ids("<image>")
    for key, value in processor.items():
        setattr(config.processor, key, value)
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    tiny.open_gates(model)
    save_pretrained(model, directory, tokenizer=tok)
    return directory
