"""Any transformers causal LM as vlm's language decoder: frozen, trainable or with LoRA."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from vlm.registry import register_decoder
from vlm.schema import ConfigError


@dataclass
class LoraSettings:
    """LoRA adapters through peft; the LM's own weights stay frozen.

    Args:
        target_modules: module names to adapt; ``None`` uses peft's default for the family.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None


@dataclass
class HFDecoderConfig:
    """A transformers causal LM, loaded from a local directory or built from a config.

    Args:
        pretrained: a local directory written by ``save_pretrained`` (config + weights).
        hf_config: a transformers config as a dict with ``model_type`` (random init),
            used when ``pretrained`` is not set.
        freeze: keep the LM's weights fixed in training.
        lora: add LoRA adapters (implies a frozen base).
        attn_implementation: ``"sdpa"``, ``"flash_attention_2"`` (when flash-attn is installed) or
            ``"flex_attention"`` (packed rows then take a FlexAttention block mask instead of a
            dense ``T x T`` one; it trains on GPUs only, as FlexAttention has no CPU backward).
        dtype: weights' dtype, e.g. ``"bfloat16"``; ``None`` keeps float32.
    """

    name: str = "hf"
    pretrained: str | None = None
    hf_config: dict[str, Any] | None = None
    freeze: bool = True
    lora: LoraSettings | None = None
    attn_implementation: str = "sdpa"
    dtype: str | None = None


def _load_lm(config: HFDecoderConfig) -> nn.Module:
    kwargs: dict[str, Any] = {"attn_implementation": config.attn_implementation}
    if config.dtype is not None:
        kwargs["dtype"] = getattr(torch, config.dtype)
    if config.pretrained is not None:
        path = Path(config.pretrained)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"decoder.pretrained={config.pretrained!r} is not a local transformers model "
                "directory (no config.json); save one with model.save_pretrained(DIR) and point "
                "decoder.pretrained at DIR"
            )
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not config.hf_config or "model_type" not in config.hf_config:
        raise ConfigError(
            "the decoder needs decoder.pretrained (a local model directory) or decoder.hf_config "
            "(a transformers config dict with 'model_type', e.g. {'model_type': 'llama', ...})"
        )
    options = dict(config.hf_config)
    try:
        hf_config = AutoConfig.for_model(options.pop("model_type"), **options)
        return AutoModelForCausalLM.from_config(hf_config, **kwargs)
    except ValueError as err:  # unknown model_type, or a family with no causal LM head
        raise ConfigError(f"decoder.hf_config cannot build a causal LM: {err}") from err


def find_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's list of decoder layers (``model.layers``, ``transformer.h``, ``decoder.layers``...)."""
    n = lm.config.get_text_config().num_hidden_layers
    for _, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"cannot find the {n} decoder layers of {type(lm).__name__}")


@register_decoder("hf", HFDecoderConfig)
class HFDecoder(nn.Module):
    """Wraps the LM; makes room for the ``<image>`` token, then applies freeze / LoRA.

    Args:
        image_token_id: the placeholder's id; ``None`` appends a new row to the embeddings
            and uses it. An id past the end of the embeddings (a token just added to the
            tokenizer) grows them to fit.
    """

    def __init__(self, config: HFDecoderConfig, *, image_token_id: int | None = None):
        super().__init__()
        self.config = config
        self.lm = _load_lm(config)
        text_config = self.lm.config.get_text_config()
        self.hidden_size = text_config.hidden_size
        self.num_layers = text_config.num_hidden_layers
        # The forward argument that takes the KV cache (renamed ``cache`` in recent transformers).
        parameters = inspect.signature(self.lm.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.supports_logits_to_keep = "logits_to_keep" in parameters
        rows = self.lm.get_input_embeddings().num_embeddings
        self.image_token_id = rows if image_token_id is None else image_token_id
        if self.image_token_id >= rows:
            self._grow_vocab(self.image_token_id + 1)
        self._set_trainable()

    def _grow_vocab(self, size: int) -> None:
        """New rows set to the mean embedding: deterministic, so a rebuilt base matches the
        one a bridge was trained on."""
        old = self.lm.get_input_embeddings().num_embeddings
        self.lm.resize_token_embeddings(size, mean_resizing=False)
        with torch.no_grad():
            for emb in (self.lm.get_input_embeddings(), self.lm.get_output_embeddings()):
                if emb is not None:
                    emb.weight[old:] = emb.weight[:old].mean(0)

    def _set_trainable(self) -> None:
        if self.config.lora is not None:
            # peft takes seconds to import, and only LoRA needs it.
            from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415

            self.lm.requires_grad_(False)
            lora = self.config.lora
            inject_adapter_in_model(
                LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=lora.target_modules,
                ),
                self.lm,
            )  # only the new lora_ parameters require grad
        elif self.config.freeze:
            self.lm.requires_grad_(False)

    def layers(self) -> nn.ModuleList:
        return find_layers(self.lm)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.lm.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None, **kwargs: Any):
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
