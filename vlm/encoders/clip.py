"""CLIP vision towers from open-clip-torch, by any name in ``open_clip.list_models()``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vlm.encoders.base import ImageEncoder, resolve_layer
from vlm.registry import register_encoder
from vlm.schema import ConfigError


@dataclass
class CLIPConfig:
    """An open_clip vision tower.

    Args:
        model: an architecture name from ``open_clip.list_models()``, e.g. ``"ViT-L-14-336"``.
        checkpoint: a local open_clip checkpoint file (``.pt``/``.bin``/``.safetensors``);
            ``None`` initialises randomly.
        feature_layer: hidden state to return, indexed as transformers' ``hidden_states``
            (``-2`` = penultimate block, LLaVA's default).
        keep_class_token: return the class token before the patch tokens (LLaVA ``"full"``).
        final_norm: apply the tower's final norm to the features.
        image_size: override the architecture's input size.
        freeze: keep the tower's weights fixed in training.
    """

    name: str = "clip"
    model: str = "ViT-L-14-336"
    checkpoint: str | None = None
    feature_layer: int = -2
    keep_class_token: bool = False
    final_norm: bool = False
    image_size: int | None = None
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

        pre = self.tower.preprocess_cfg
        self.mean, self.std = tuple(pre["mean"]), tuple(pre["std"])
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
