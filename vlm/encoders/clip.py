"""CLIP vision towers from open-clip-torch, by any name in ``open_clip.list_models()``: open_clip's
own ViTs and ResNets, and timm trunks (open_clip's SigLIP towers)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vlm.encoders.base import ImageEncoder, resolve_layer
from vlm.registry import register_encoder
from vlm.schema import ConfigError

log = logging.getLogger(__name__)


@dataclass
class CLIPConfig:
    """An open_clip vision tower.

    open_clip's SigLIP towers (``ViT-*-SigLIP*``) are timm ViTs without a class token: their
    features are the patch tokens of the selected block (``final_norm``: after the trunk's final
    norm), computed by timm's own modules (exact-erf GELU, as open_clip's weights were made for).
    transformers' SigLIP checkpoints load into vlm's ``vit`` encoder instead
    (:func:`vlm.convert.towers.siglip_config`).

    Args:
        model: an architecture name from ``open_clip.list_models()``, e.g. ``"ViT-L-14-336"``.
        checkpoint: a local open_clip checkpoint file (``.pt``/``.bin``/``.safetensors``);
            ``None`` initialises randomly.
        feature_layer: hidden state to return, indexed as transformers' ``hidden_states``
            (``-2`` = penultimate block, LLaVA's default).
        keep_class_token: return the class token before the patch tokens (LLaVA ``"full"``);
            only open_clip's own ViTs have one.
        final_norm: apply the tower's final norm to the features.
        image_size: override the architecture's input size.
        mean: the image normalisation's mean; ``None``: open_clip's for the architecture. With a
            local checkpoint open_clip knows no pretrained tag, and falls back to OpenAI CLIP's
            normalisation where the architecture's config names none: SigLIP's towers want
            ``[0.5, 0.5, 0.5]`` for ``mean`` and ``std`` (a warning says so).
        std: the image normalisation's standard deviation; ``None``: open_clip's.
        freeze: keep the tower's weights fixed in training.
    """

    name: str = "clip"
    model: str = "ViT-L-14-336"
    checkpoint: str | None = None
    feature_layer: int = -2
    keep_class_token: bool = False
    final_norm: bool = False
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    freeze: bool = True


@register_encoder("clip", CLIPConfig)
class CLIPEncoder(ImageEncoder):
    builds_empty = False  # open_clip moves its model to a device while building it

    def __init__(self, config: CLIPConfig):
        super().__init__()
        import open_clip  # noqa: PLC0415  (seconds to import; only CLIP towers need it)

        if config.model not in open_clip.list_models():
            close = [m for m in open_clip.list_models() if config.model.lower() in m.lower()][:5]
            hint = f" Did you mean one of: {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"encoder.model={config.model!r} is not an open_clip architecture.{hint} "
                "Use a name from open_clip.list_models()."
            )
        if config.checkpoint is not None and not Path(config.checkpoint).is_file():
            raise ConfigError(
                f"encoder.checkpoint {config.checkpoint!r} does not exist; point it at a local "
                "open_clip checkpoint file, or set it to null for random initialisation"
            )
        self.config = config
        clip = open_clip.create_model(
            config.model, pretrained=config.checkpoint, force_image_size=config.image_size
        )
        self.tower = clip.visual  # the text tower is dropped
        self.is_vit = isinstance(self.tower, open_clip.transformer.VisionTransformer)
        if config.keep_class_token and not self.is_vit:
            raise ConfigError(
                f"encoder.keep_class_token=true, but encoder.model={config.model!r} is not one of "
                "open_clip's own ViTs and has no class token to keep (SigLIP towers, timm trunks and "
                "ResNets return the patch tokens or feature map only); set keep_class_token=false"
            )
        size = self.tower.image_size
        self.image_size = size[0] if isinstance(size, tuple) else size
        depth = len(self.tower.transformer.resblocks) if self.is_vit else self._num_stages()
        # open_clip indexes blocks 0..depth-1; our hidden-state index h is block h - 1.
        self.block = resolve_layer(config.feature_layer, depth, where="encoder") - 1
        if self.block < 0:
            raise ConfigError("encoder.feature_layer must select a block output for CLIP towers, not 0")
        if self.is_vit:  # weights past the selected block never run: never train them
            self.tower.transformer.resblocks[self.block + 1 :].requires_grad_(False)
            self.tower.ln_post.requires_grad_(config.final_norm)
            if self.tower.proj is not None:
                self.tower.proj.requires_grad_(False)
        elif hasattr(getattr(self.tower, "trunk", None), "blocks"):  # a timm ViT (SigLIP's towers)
            trunk = self.tower.trunk
            # Blocks past the selected one, the pooling and the projections never run.
            unused = [trunk.blocks[self.block + 1 :], getattr(self.tower, "head", None)]
            unused += [getattr(trunk, name, None) for name in ("attn_pool", "fc_norm", "head")]
            unused += [] if config.final_norm else [getattr(trunk, "norm", None)]
            for module in unused:
                if isinstance(module, torch.nn.Module):
                    module.requires_grad_(False)

        pre = self.tower.preprocess_cfg
        self.mean = tuple(pre["mean"]) if config.mean is None else tuple(config.mean)
        self.std = tuple(pre["std"]) if config.std is None else tuple(config.std)
        if config.mean is None and config.std is None:
            _warn_normalisation(open_clip, config.model, (self.mean, self.std))
        with torch.no_grad():
            probe = self.forward(torch.zeros(1, 3, self.image_size, self.image_size))
        self.num_tokens, self.feature_dim = probe.shape[1:]

    @torch.no_grad()
    def _num_stages(self) -> int:
        """Feature stages of a non-ViT tower (ResNet stem + 4 layers, timm stages)."""
        probe = torch.zeros(1, 3, self.image_size, self.image_size)
        return len(self.tower.forward_intermediates(probe, intermediates_only=True)["image_intermediates"])

    def forward(self, pixels: Tensor) -> Tensor:
        out = self.tower.forward_intermediates(
            pixels,
            indices=[self.block],
            stop_early=True,
            intermediates_only=True,
            normalize_intermediates=self.config.final_norm,
            output_fmt="NLC" if self.is_vit else "NCHW",
            output_extra_tokens=self.config.keep_class_token and self.is_vit,
        )
        x = out["image_intermediates"][0]
        if not self.is_vit:  # (B, C, H, W) feature map -> tokens
            return x.flatten(2).transpose(1, 2)
        if self.config.keep_class_token:
            x = torch.cat([out["image_intermediates_prefix"][0], x], dim=1)
        return x


def _warn_normalisation(open_clip, model: str, used: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
    """Warns when every pretrained tag open_clip knows for ``model`` normalises images otherwise
    than ``used``: a local checkpoint of it gets open_clip's fallback (OpenAI CLIP's), not its own."""
    tags = open_clip.list_pretrained_tags_by_model(model)
    configs = [open_clip.get_pretrained_cfg(model, tag) for tag in tags]
    stats = {(tuple(c["mean"]), tuple(c["std"])) for c in configs if "mean" in c and "std" in c}
    if len(stats) == 1 and stats != {used}:
        mean, std = next(iter(stats))
        log.warning(
            "encoder.model=%r: open_clip's pretrained weights for it normalise images with mean %s, "
            "std %s, but a local checkpoint gets mean %s, std %s; set encoder.mean and encoder.std "
            "to the ones its weights were trained with",
            model,
            list(mean),
            list(std),
            list(used[0]),
            list(used[1]),
        )
