"""What every converter needs: reading transformers weights, renaming them, loading them exactly."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlm.encoders.base import CLIP_MEAN, CLIP_STD
from vlm.encoders.vit import ViTConfig
from vlm.files import read_json, read_safetensors
from vlm.model import VisionLanguageModel
from vlm.schema import ConfigError
from vlm.weights import finish_assigned, load_covering, load_tokenizer

log = logging.getLogger(__name__)


class Checkpoint(dict):
    """A checkpoint's tensors by name, remembering which ones :func:`select` took, so that a
    conversion can say what it left behind."""

    def __init__(self, tensors: dict[str, Tensor], source: Path):
        super().__init__(tensors)
        self.source = source
        self.selected: set[str] = set()

    def warn_unused(self) -> list[str]:
        """Logs (and returns) the tensors no part of the model took."""
        unused = sorted(set(self) - self.selected)
        if unused:
            shown = ", ".join(unused[:8]) + (", ..." if len(unused) > 8 else "")
            log.warning(
                "%d tensor(s) in %s have no place in the converted model and were not loaded: %s",
                len(unused),
                self.source,
                shown,
            )
        return unused


def read_weights(path: Path) -> Checkpoint:
    """Every tensor of a transformers directory: ``model.safetensors``, its sharded index, or
    ``pytorch_model.bin``."""
    if (path / "model.safetensors").is_file():
        return Checkpoint(read_safetensors(path / "model.safetensors"), path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
        return Checkpoint({k: v for f in files for k, v in read_safetensors(path / f).items()}, path)
    if (path / "pytorch_model.bin").is_file():
        return Checkpoint(torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True), path)
    raise ConfigError(
        f"no weights in {str(path)!r}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def select(weights: dict[str, Tensor], prefixes: dict[str, str]) -> dict[str, Tensor]:
    """The tensors under any of ``prefixes`` (old -> new; the first match renames a key). Taken
    from a :class:`Checkpoint`, they count as used."""
    out, taken = {}, []
    for key, value in weights.items():
        for old, new in prefixes.items():
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                taken.append(key)
                break
    if isinstance(weights, Checkpoint):
        weights.selected.update(taken)
    return out


def finish(model: VisionLanguageModel, weights: Checkpoint) -> VisionLanguageModel:
    """After every part is loaded: no parameter left empty, and the checkpoint's leftovers named."""
    finish_assigned(model)
    weights.warn_unused()
    return model


def load_exact(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Loads ``state`` into ``module`` (its tensors become the parameters); every parameter must
    be covered (a tied weight under either of its names) and every tensor used."""
    missing, unexpected = load_covering(module, state, assign=True)
    if missing or unexpected:
        raise ConfigError(
            f"the checkpoint's {what} weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )


def image_stats(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation in ``preprocessor_config.json`` (or in ``processor_config.json``'s
    image processor, where recent transformers save it), or CLIP's (what these models use)."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        file = path / name
        if file.is_file():
            pre = json.loads(file.read_text())
            pre = pre.get(key, {}) if key else pre
            if "image_mean" in pre and "image_std" in pre:
                return tuple(pre["image_mean"]), tuple(pre["image_std"])
    return CLIP_MEAN, CLIP_STD


def vit_config(vision: Any, path: Path, **options: Any) -> ViTConfig:
    """vlm's ViT with the sizes of a transformers CLIP-like vision config."""
    width = getattr(vision, "hidden_size", None) or vision.embed_dim
    mean, std = image_stats(path)
    return ViTConfig(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        width=width,
        depth=vision.num_hidden_layers,
        num_heads=vision.num_attention_heads,
        mlp_ratio=vision.intermediate_size / width,
        layer_norm_eps=vision.layer_norm_eps,
        act={"gelu_pytorch_tanh": "gelu_tanh"}.get(vision.hidden_act, vision.hidden_act),
        mean=mean,
        std=std,
        freeze=True,
        **options,
    )


def vit_state(weights: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """A CLIP-like vision tower's tensors (transformers names, prefix removed) as vlm ViT's."""
    w = dict(weights)
    out = {
        "class_token": w.pop("embeddings.class_embedding").reshape(-1),
        "pos_embed": _position_table(w),
        "patch_embed.weight": w.pop("embeddings.patch_embedding.weight"),
    }
    rename = {
        "pre_layrnorm.": "norm_pre.",
        "post_layernorm.": "norm.",
        "embeddings.patch_embedding.": "patch_embed.",
    }
    for i in range(depth):
        src, dst = f"encoder.layers.{i}.", f"blocks.{i}."
        if f"{src}self_attn.qkv.weight" not in w:  # CLIP: separate q, k, v; BLIP-2 stores qkv fused
            fuse(w, [f"{src}self_attn.{p}_proj" for p in "qkv"], f"{src}self_attn.qkv")
        rename |= {
            f"{src}self_attn.qkv.": f"{dst}attn.qkv.",
            f"{src}self_attn.out_proj.": f"{dst}attn.out.",
            f"{src}self_attn.projection.": f"{dst}attn.out.",
            f"{src}layer_norm1.": f"{dst}norm1.",
            f"{src}layer_norm2.": f"{dst}norm2.",
            f"{src}mlp.fc1.": f"{dst}mlp.0.",
            f"{src}mlp.fc2.": f"{dst}mlp.2.",
        }
    return out | select(w, rename)


def clip_vision_state(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """vlm ViT's tensors as a transformers CLIP vision tower's (names under the tower): the
    inverse of :func:`vit_state`, the fused ``qkv`` split back into ``q``, ``k``, ``v``."""
    w = dict(state)
    out = {
        "embeddings.class_embedding": w.pop("class_token"),
        "embeddings.position_embedding.weight": w.pop("pos_embed"),
        "embeddings.patch_embedding.weight": w.pop("patch_embed.weight"),
    }
    if "patch_embed.bias" in w:  # BLIP-2's EVA tower
        out["embeddings.patch_embedding.bias"] = w.pop("patch_embed.bias")
    rename = {"norm_pre.": "pre_layrnorm.", "norm.": "post_layernorm."}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layers.{i}."
        unfuse(w, f"{src}attn.qkv", [f"{dst}self_attn.{name}_proj" for name in "qkv"], out)
        rename |= {
            f"{src}attn.out.": f"{dst}self_attn.out_proj.",
            f"{src}norm1.": f"{dst}layer_norm1.",
            f"{src}norm2.": f"{dst}layer_norm2.",
            f"{src}mlp.0.": f"{dst}mlp.fc1.",
            f"{src}mlp.2.": f"{dst}mlp.fc2.",
        }
    return out | select(w, rename)


#: vlm's ViT activations by the names transformers' configs give them.
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def clip_vision_config(encoder: Any) -> dict[str, Any]:
    """A transformers ``CLIPVisionConfig``'s keys for vlm's ViT config ``encoder``, or a
    ``ConfigError`` naming each option CLIP's tower has no counterpart for."""
    problems = {
        f"encoder {encoder.name!r} (only vlm's ViT exports)": encoder.name != "vit",
        f"encoder.stem={getattr(encoder, 'stem', None)!r}": getattr(encoder, "stem", "patch") != "patch",
        "encoder.patch_bias=true": getattr(encoder, "patch_bias", False),
        "encoder.pre_norm=false": not getattr(encoder, "pre_norm", True),
        "encoder.final_norm=true": getattr(encoder, "final_norm", False),
        f"encoder.act={getattr(encoder, 'act', None)!r}": getattr(encoder, "act", "gelu")
        not in HF_ACTIVATIONS,
    }
    refuse(problems, "transformers' CLIP vision tower")
    return vision_sizes(encoder) | {"hidden_act": HF_ACTIVATIONS[encoder.act]}


def vision_sizes(encoder: Any) -> dict[str, Any]:
    """The sizes of vlm's ViT config ``encoder`` under the keys of transformers' vision configs
    (CLIP's, BLIP-2's, IDEFICS's, which take ``embed_dim`` for ``hidden_size``)."""
    return dict(
        hidden_size=encoder.width,
        intermediate_size=round(encoder.width * encoder.mlp_ratio),
        num_hidden_layers=encoder.depth,
        num_attention_heads=encoder.num_heads,
        image_size=encoder.image_size,
        patch_size=encoder.patch_size,
        layer_norm_eps=encoder.layer_norm_eps,
    )


def refuse(problems: dict[str, bool], target: str) -> None:
    """One ``ConfigError`` naming every option (the keys that are true) ``target`` lacks."""
    found = [k for k, v in problems.items() if v]
    if found:
        raise ConfigError(
            f"this model does not export to {target}: " + ", ".join(found) + " has no counterpart there"
        )


def _position_table(w: dict[str, Tensor]) -> Tensor:
    table = w.pop("embeddings.position_embedding.weight", None)
    if table is None:  # BLIP-2 keeps it as a bare (1, N, D) parameter
        table = w.pop("embeddings.position_embedding")
    w.pop("embeddings.position_ids", None)  # a buffer in old checkpoints
    return table.reshape(-1, table.shape[-1])


def fuse(w: dict[str, Tensor], parts: list[str], into: str) -> None:
    """Concatenates the weights (and biases, when present) of separate projections (q, k, v) into
    the one fused projection vlm uses."""
    for kind in ("weight", "bias"):
        if f"{parts[0]}.{kind}" in w:
            w[f"{into}.{kind}"] = torch.cat([w.pop(f"{p}.{kind}") for p in parts])


def unfuse(w: dict[str, Tensor], fused: str, parts: list[str], out: dict[str, Tensor]) -> None:
    """The inverse of :func:`fuse`: splits ``fused``'s weight (and bias, when present) taken from
    ``w`` into equal ``parts`` written to ``out`` (exports name transformers' separate projections)."""
    for kind in ("weight", "bias"):
        if f"{fused}.{kind}" in w:
            for part, tensor in zip(parts, w.pop(f"{fused}.{kind}").chunk(len(parts))):
                out[f"{part}.{kind}"] = tensor


def image_token_from_tokenizer(path: Path, token: str = "<image>") -> int:
    """The id of ``token`` in the tokenizer saved beside a checkpoint."""
    try:
        tokenizer = load_tokenizer(path)
    except ConfigError as err:
        raise ConfigError(f"{err}: the checkpoint's tokenizer names the {token} token's id") from err
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError(f"the tokenizer in {str(path)!r} has no {token} token")
    return token_id
