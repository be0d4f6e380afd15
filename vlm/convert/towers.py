"""Vision towers both ways: transformers' CLIP tower (LLaVA's, IDEFICS's), BLIP-2's EVA tower and
SigLIP's tower (Idefics3's, SmolVLM's, LLaVA-OneVision's) as vlm's ViT, and vlm's encoders (its
ViT, open_clip's ViTs) as transformers' CLIP tower (vlm's ViT also as SigLIP's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vlm.convert.common import KeyMap, image_stats, load_exact, refuse, select
from vlm.encoders.vit import ViTConfig
from vlm.schema import ConfigError

#: vlm's ViT activations by the names transformers' configs give them.
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}


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
        act={v: k for k, v in HF_ACTIVATIONS.items()}.get(vision.hidden_act, vision.hidden_act),
        mean=mean,
        std=std,
        freeze=True,
        **options,
    )


def _blocks(depth: int, names: dict[str, str]) -> dict[str, str]:
    """``names`` (transformers' layer-relative prefix -> vlm's block-relative one) for each block."""
    return {
        f"encoder.layers.{i}.{theirs}": f"blocks.{i}.{ours}"
        for i in range(depth)
        for theirs, ours in names.items()
    }


_LAYER = {
    "layer_norm1.": "norm1.",
    "layer_norm2.": "norm2.",
    "mlp.fc1.": "mlp.0.",
    "mlp.fc2.": "mlp.2.",
}


def clip_tower_map(depth: int) -> KeyMap:
    """transformers' CLIP vision tower (names under ``vision_model``) <-> vlm's ViT."""
    return KeyMap(
        renames={
            "embeddings.class_embedding": "class_token",
            "embeddings.position_embedding.weight": "pos_embed",
            "embeddings.patch_embedding.": "patch_embed.",
            "pre_layrnorm.": "norm_pre.",
            "post_layernorm.": "norm.",
        }
        | _blocks(depth, _LAYER | {"self_attn.out_proj.": "attn.out."}),
        fused=tuple(
            (tuple(f"encoder.layers.{i}.self_attn.{p}_proj" for p in "qkv"), f"blocks.{i}.attn.qkv")
            for i in range(depth)
        ),
    )


def eva_tower_map(depth: int) -> KeyMap:
    """BLIP-2's EVA tower in transformers (fused qkv, a patch bias, no pre-norm, the position
    table a bare parameter) <-> vlm's ViT. Shapes differing by size-1 dimensions (BLIP-2's
    ``(1, 1, D)`` class token) are fitted on loading."""
    return KeyMap(
        renames={
            "embeddings.class_embedding": "class_token",
            "embeddings.position_embedding": "pos_embed",
            "embeddings.patch_embedding.": "patch_embed.",
            "post_layernorm.": "norm.",
        }
        | _blocks(depth, _LAYER | {"self_attn.qkv.": "attn.qkv.", "self_attn.projection.": "attn.out."})
    )


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


@dataclass(frozen=True)
class VisionTower:
    """A vlm image encoder as a transformers vision tower (CLIP's or SigLIP's): what LLaVA's and
    IDEFICS's exports write.

    Attributes:
        config: the vision config's keys (``CLIPVisionConfig``'s or ``SiglipVisionConfig``'s).
        state: the tower's tensors under transformers' names (those under ``vision_model``, or
            under the prefix the export asked for).
        feature_layer: the hidden state vlm's features are, as transformers indexes
            ``hidden_states`` from the end (``-1``: the last block's output).
        keep_class_token: the features start with the class token.
        post_norm: the features are ``last_hidden_state`` (the last block's output after
            ``post_layernorm``), not ``hidden_states[feature_layer]``.
    """

    config: dict[str, Any]
    state: dict[str, Tensor]
    feature_layer: int
    keep_class_token: bool
    post_norm: bool = False


CLIPTower = VisionTower  # the name LLaVA's and IDEFICS's exports knew it by


def vit_tower(encoder: nn.Module) -> CLIPTower:
    """vlm's ViT as a CLIP tower."""
    config = encoder.config
    refuse(
        {
            f"encoder.stem={config.stem!r}": config.stem != "patch",
            "encoder.class_token=false": not config.class_token,
            "encoder.patch_bias=true": config.patch_bias,
            "encoder.pre_norm=false": not config.pre_norm,
            "encoder.final_norm=true": config.final_norm,
            f"encoder.act={config.act!r}": config.act not in HF_ACTIVATIONS,
        },
        "transformers' CLIP vision tower",
    )
    return CLIPTower(
        config=vision_sizes(config) | {"hidden_act": HF_ACTIVATIONS[config.act]},
        state=clip_tower_map(config.depth).to_transformers(encoder.state_dict()),
        feature_layer=encoder.blocks_to_run - config.depth - 1,
        keep_class_token=config.keep_class_token,
    )


def open_clip_tower_map(depth: int) -> KeyMap:
    """transformers' CLIP vision tower <-> an open_clip ``VisionTransformer`` (its attention's
    ``in_proj_weight`` spelt ``in_proj.weight``). open_clip's ``proj`` (to the joint image-text
    space) has no place in the tower and is left out."""
    return KeyMap(
        renames={
            "embeddings.class_embedding": "class_embedding",
            "embeddings.position_embedding.weight": "positional_embedding",
            "embeddings.patch_embedding.weight": "conv1.weight",
            "pre_layrnorm.": "ln_pre.",
            "post_layernorm.": "ln_post.",
        }
        | {
            f"encoder.layers.{i}.{theirs}": f"transformer.resblocks.{i}.{ours}"
            for i in range(depth)
            for theirs, ours in {
                "self_attn.out_proj.": "attn.out_proj.",
                "layer_norm1.": "ln_1.",
                "layer_norm2.": "ln_2.",
                "mlp.fc1.": "mlp.c_fc.",
                "mlp.fc2.": "mlp.c_proj.",
            }.items()
        },
        fused=tuple(
            (
                tuple(f"encoder.layers.{i}.self_attn.{p}_proj" for p in "qkv"),
                f"transformer.resblocks.{i}.attn.in_proj",
            )
            for i in range(depth)
        ),
    )


def open_clip_tower(encoder: nn.Module) -> CLIPTower:
    """An open_clip ViT (vlm's ``clip`` encoder) as a CLIP tower: the blocks of OpenAI's CLIP,
    without layer scale, with a pre-norm, GELU or QuickGELU."""
    import open_clip  # noqa: PLC0415  (only open_clip towers get here: the encoder imported it)

    config, tower = encoder.config, encoder.tower
    vit = isinstance(tower, open_clip.transformer.VisionTransformer)
    blocks = list(tower.transformer.resblocks) if vit else []
    # The activation's name in transformers' configs (None: none there).
    acts = {"GELU:none": "gelu", "GELU:tanh": "gelu_pytorch_tanh", "QuickGELU:": "quick_gelu"}
    gelu = blocks[0].mlp.gelu if blocks else None
    act = acts.get(f"{type(gelu).__name__}:{getattr(gelu, 'approximate', '')}")
    size = getattr(tower, "image_size", (0, 0))
    patch = getattr(tower, "patch_size", (0, 0))
    model = f"encoder.model={config.model!r}"
    refuse(
        {
            f"{model} (not a ViT)": not vit,
            "encoder.final_norm=true": config.final_norm,
            f"{model} (layer scale, ls_init_value)": any(not isinstance(b.ls_1, nn.Identity) for b in blocks),
            # CLIP's blocks: one fused q/k/v projection (the map splits it) and an output one.
            f"{model} (attention blocks other than CLIP's)": any(
                getattr(getattr(b, "attn", None), "in_proj_weight", None) is None or hasattr(b, "ln_attn")
                for b in blocks
            ),
            f"{model} (a norm inside the MLP, scale_fc)": any(
                not isinstance(getattr(b.mlp, "ln", nn.Identity()), nn.Identity) for b in blocks
            ),
            f"{model} (no ln_pre)": vit and isinstance(tower.ln_pre, nn.Identity),
            f"{model} (activation {type(gelu).__name__})": vit and act is None,
            f"{model} (non-square images or patches)": vit and (size[0] != size[1] or patch[0] != patch[1]),
        },
        "transformers' CLIP vision tower",
    )
    first = blocks[0]
    width = tower.class_embedding.shape[-1]
    # nn.MultiheadAttention names its fused projection ``in_proj_weight``; the map spells it as a module.
    state = {k.replace(".attn.in_proj_", ".attn.in_proj."): v for k, v in tower.state_dict().items()}
    return CLIPTower(
        config=dict(
            hidden_size=width,
            intermediate_size=first.mlp.c_fc.out_features,
            num_hidden_layers=len(blocks),
            num_attention_heads=first.attn.num_heads,
            image_size=size[0],
            patch_size=patch[0],
            layer_norm_eps=first.ln_1.eps,
            hidden_act=act,
        ),
        state=open_clip_tower_map(len(blocks)).to_transformers(state),
        feature_layer=encoder.block - len(blocks),
        keep_class_token=config.keep_class_token,
    )


#: vlm's encoders that export as transformers' CLIP tower, by name.
CLIP_TOWERS: dict[str, Callable[[nn.Module], CLIPTower]] = {"vit": vit_tower, "clip": open_clip_tower}


def clip_tower(encoder: nn.Module) -> CLIPTower:
    """``encoder`` as transformers' CLIP tower, or a ``ConfigError`` naming what it lacks."""
    name = encoder.config.name
    if name not in CLIP_TOWERS:
        raise ConfigError(
            f"this model does not export to transformers' CLIP vision tower: encoder {name!r} has no "
            f"counterpart there (exportable encoders: {', '.join(CLIP_TOWERS)})"
        )
    return CLIP_TOWERS[name](encoder)


# --- SigLIP (transformers' SiglipVisionModel; Idefics3's and SmolVLM's tower) ------------------

#: SigLIP's normalisation (its processors' ``image_mean`` and ``image_std``).
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
#: The files :func:`image_stats` reads the normalisation from.
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def siglip_config(vision: Any, path: Path | None = None, **options: Any) -> ViTConfig:
    """vlm's ViT shaped as transformers' SigLIP vision tower: no class token (``grid**2``
    positions), a patch bias, no pre-norm, and by default the tower's own output,
    ``last_hidden_state`` (``feature_layer=-1, final_norm=True``: the last block after
    ``post_layernorm``, Idefics3's and SmolVLM's features). LLaVA-OneVision's features,
    ``hidden_states[-1]`` of a tower whose last layer was removed, are ``final_norm=False``.

    Args:
        vision: a ``SiglipVisionConfig`` (or Idefics3's vision config, the same keys).
        path: the checkpoint's directory, whose processor files give the normalisation; ``None``
            (or no such file there): SigLIP's mean and std of 0.5.
        options: other :class:`ViTConfig` fields, over these (``feature_layer``, ``final_norm``).

    Raises:
        ConfigError: the tower has something vlm's ViT cannot represent (an activation other
            than GELU, tanh GELU or QuickGELU; other than 3 input channels).
    """
    act = {theirs: ours for ours, theirs in HF_ACTIVATIONS.items()}.get(vision.hidden_act)
    channels = getattr(vision, "num_channels", 3)
    problems = {
        f"hidden_act={vision.hidden_act!r} (vlm's ViT has {', '.join(HF_ACTIVATIONS.values())})": act is None,
        f"num_channels={channels} (vlm's ViT reads RGB images, 3 channels)": channels != 3,
    }
    found = [k for k, v in problems.items() if v]
    if found:
        raise ConfigError(
            "this SigLIP vision tower does not convert to vlm's ViT: " + ", ".join(found) + " has no "
            "counterpart there"
        )
    width = vision.hidden_size
    mean, std = SIGLIP_MEAN, SIGLIP_STD
    if path is not None and any((Path(path) / name).is_file() for name in _PROCESSOR_FILES):
        mean, std = image_stats(Path(path))
    settings = dict(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        width=width,
        depth=vision.num_hidden_layers,
        num_heads=vision.num_attention_heads,
        mlp_ratio=vision.intermediate_size / width,
        layer_norm_eps=vision.layer_norm_eps,
        act=act,
        class_token=False,
        pre_norm=False,
        patch_bias=True,
        feature_layer=-1,
        final_norm=True,
        mean=tuple(mean),
        std=tuple(std),
        freeze=True,
    )
    return ViTConfig(**(settings | options))


def siglip_tower_map(depth: int, prefix: str = "") -> KeyMap:
    """transformers' SigLIP vision tower <-> vlm's ViT (as :func:`siglip_config` shapes it).

    The attention-pooling ``head`` (``SiglipVisionModel`` with ``vision_use_head``) has no place
    in vlm's ViT: :meth:`KeyMap.to_vlm` leaves it out, and VLMs' towers have none.

    Args:
        depth: the tower's layers (``num_hidden_layers``).
        prefix: what the tower's names start with: ``""`` in ``SiglipVisionModel`` as
            transformers 5 saves it, ``"vision_model."`` in ``SiglipModel`` checkpoints,
            ``"model.vision_model."`` in Idefics3's and SmolVLM's.
    """
    renames = {
        "embeddings.position_embedding.weight": "pos_embed",
        "embeddings.patch_embedding.": "patch_embed.",
        "post_layernorm.": "norm.",
    } | _blocks(depth, _LAYER | {"self_attn.out_proj.": "attn.out."})
    return KeyMap(
        renames={prefix + theirs: ours for theirs, ours in renames.items()},
        fused=tuple(
            (tuple(f"{prefix}encoder.layers.{i}.self_attn.{p}_proj" for p in "qkv"), f"blocks.{i}.attn.qkv")
            for i in range(depth)
        ),
    )


def load_siglip_tower(encoder: nn.Module, weights: dict[str, Tensor], prefix: str = "") -> None:
    """Loads the SigLIP tower whose names start with ``prefix`` in ``weights`` into vlm's ViT
    ``encoder`` (built from :func:`siglip_config`, on meta or not): the tensors become its
    parameters, and every parameter must be covered. Taken from a :class:`Checkpoint`, the
    tower's tensors count as used; the rest (a ``head``, the text model) is left to be named.
    """
    keymap = siglip_tower_map(encoder.config.depth, prefix)
    names = list(keymap.renames) + [f"{part}." for parts, _ in keymap.fused for part in parts]
    tower = select(weights, {name: name for name in names})
    # A projection missing beside its siblings (q without k) would not fuse: name it.
    missing = [
        f"{part}.{kind}"
        for parts, _ in keymap.fused
        for kind in ("weight", "bias")
        if any(f"{part}.{kind}" in tower for part in parts)
        for part in parts
        if f"{part}.{kind}" not in tower
    ]
    if missing:
        raise ConfigError(f"the checkpoint's vision tower weights do not fit: missing {missing[:4]}")
    load_exact(encoder, tower, "vision tower", keymap)


def siglip_tower(encoder: nn.Module, prefix: str = "") -> VisionTower:
    """vlm's ViT as transformers' SigLIP vision tower: ``config`` has ``SiglipVisionConfig``'s
    keys (build it with ``vision_use_head=False``), ``state`` its names after ``prefix``.
    ``post_norm`` says whether the features are ``last_hidden_state``."""
    config = encoder.config
    feature_layer = encoder.blocks_to_run - config.depth - 1
    refuse(
        {
            "encoder.class_token=true": config.class_token,
            "encoder.patch_bias=false": not config.patch_bias,
            "encoder.pre_norm=true": config.pre_norm,
            f"encoder.stem={config.stem!r}": config.stem != "patch",
            f"encoder.act={config.act!r}": config.act not in HF_ACTIVATIONS,
            # transformers applies post_layernorm to the last layer's output only.
            f"encoder.final_norm=true at feature_layer={config.feature_layer}": config.final_norm
            and feature_layer != -1,
        },
        "transformers' SigLIP vision tower",
    )
    return VisionTower(
        config=vision_sizes(config) | {"hidden_act": HF_ACTIVATIONS[config.act]},
        state=siglip_tower_map(config.depth, prefix).to_transformers(encoder.state_dict()),
        feature_layer=feature_layer,
        keep_class_token=False,
        post_norm=config.final_norm,
    )
