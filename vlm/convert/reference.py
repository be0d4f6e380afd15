"""transformers' own models at chosen shapes, randomly initialised: the references that the
converters are checked against (tests) and timed against (``vlm bench``).

Each format module builds its model from a :class:`Size` (``Format.reference``);
``Format.save_reference`` saves one with :func:`placeholder_tokenizer` as a checkpoint directory
that ``vlm.from_pretrained`` converts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import transformers
from tokenizers import Tokenizer, models

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 4  # where :func:`placeholder_tokenizer` puts it
#: The decoder config's special ids: those of :func:`placeholder_tokenizer`.
SPECIAL_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class Size:
    """The shapes of a reference model: a CLIP-like tower, a Llama / OPT decoder, and the batch
    a benchmark feeds it."""

    image: int
    patch: int
    vision_width: int
    vision_depth: int
    vision_heads: int
    text_width: int
    text_depth: int
    text_heads: int
    text_kv_heads: int
    text_ffn: int
    vocab: int
    queries: int  # BLIP-2 queries / IDEFICS latents
    connector_depth: int  # Q-Former / resampler layers
    train_batch: int
    prompt: int  # text tokens before the answer
    answer: int  # labelled tokens
    gen_tokens: int
    dtype: str = "float32"
    init_range: float = 0.02


def vision_config(size: Size, **extra: Any) -> dict[str, Any]:
    """A CLIP-like vision tower's config keys at ``size``."""
    return dict(
        hidden_size=size.vision_width,
        intermediate_size=4 * size.vision_width,
        num_hidden_layers=size.vision_depth,
        num_attention_heads=size.vision_heads,
        image_size=size.image,
        patch_size=size.patch,
        **extra,
    )


def llama_config(size: Size) -> dict[str, Any]:
    """A Llama decoder's config keys at ``size`` (special ids those of the placeholder tokenizer)."""
    return dict(
        hidden_size=size.text_width,
        intermediate_size=size.text_ffn,
        num_hidden_layers=size.text_depth,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        vocab_size=size.vocab,
        initializer_range=size.init_range,
        **SPECIAL_TOKEN_IDS,
    )


def placeholder_tokenizer(vocab: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer of ``vocab`` tokens with ``<image>`` at id 4 (IDEFICS checkpoints
    carry their tokenizer, which names the image token)."""
    words = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN] + [f"w{i}" for i in range(vocab - 5)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN],
    )
