"""A ViT patch tokenizer: patch embedding, position embeddings, pre-norm blocks. CLIP-shaped by
default; SigLIP-shaped (no class token, no pre-norm, a patch bias, tanh GELU, the post-norm on
the last layer) with options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from vlm.attention import MultiHeadAttention
from vlm.encoders.base import CLIP_MEAN, CLIP_STD, ImageEncoder, resolve_layer
from vlm.registry import register_encoder
from vlm.schema import ConfigError


@dataclass
class ViTConfig:
    """A ViT written here, CLIP-shaped by default (ViT-B/16 sizes).

    SigLIP's tower (transformers' ``SiglipVisionModel``, Idefics3's and LLaVA-OneVision's) is
    ``class_token=False, pre_norm=False, patch_bias=True, act="gelu_tanh", layer_norm_eps=1e-6``
    (:func:`vlm.convert.towers.siglip_config` builds it from transformers' config).

    Args:
        feature_layer: hidden state to return, indexed as transformers' ``hidden_states``
            (``0`` the embeddings, ``i`` block ``i``'s output, ``-1`` the last block's, ``-2`` the
            penultimate, LLaVA's default).
        class_token: the ViT has a class token (CLIP, EVA): ``1 + grid**2`` positions. ``False``:
            none at all, no class embedding and ``grid**2`` positions (SigLIP).
        keep_class_token: return the class token before the patch tokens (needs ``class_token``).
        final_norm: apply the final LayerNorm (``norm``) to every returned token, at whichever
            ``feature_layer``. With ``feature_layer=-1`` that is SigLIP's ``post_layernorm``:
            the features are transformers' ``last_hidden_state`` (Idefics3's, SmolVLM's). With
            ``final_norm=False`` and ``feature_layer=-1`` they are ``hidden_states[-1]``, the last
            block's output before the post-norm (LLaVA-OneVision's ``"full"`` features). Before
            the last block only vlm has the option (BLIP-2 style; transformers' SigLIP applies
            the post-norm to ``last_hidden_state`` only).
        act: MLP activation: ``"gelu"``, ``"quick_gelu"`` (OpenAI CLIP) or ``"gelu_tanh"``.
        pre_norm: a LayerNorm after the embeddings (CLIP); BLIP-2's EVA ViT has none.
        patch_bias: a bias on the patch embedding (BLIP-2).
        pos_init: ``"random"`` (small random position embeddings, learned) or ``"sincos"`` (a fixed
            2-D sine-cosine table as the starting point, still learned; MAE's choice): a model
            trained from scratch knows where each patch sits from the first step.
        stem: ``"patch"`` embeds each patch with one strided convolution (ViT, CLIP);
            ``"conv"`` with stride-2 3x3 convolutions down to the patch grid, which trains much
            faster from scratch (Xiao et al. 2021, "Early convolutions help transformers see
            better"); needs a power-of-two patch size.
        checkpoint: a local ``.safetensors`` file of this encoder's weights.
        freeze: keep the encoder's weights fixed in training.
    """

    name: str = "vit"
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5
    feature_layer: int = -2
    class_token: bool = True
    keep_class_token: bool = False
    final_norm: bool = False
    act: str = "gelu"
    pre_norm: bool = True
    patch_bias: bool = False
    stem: str = "patch"
    pos_init: str = "random"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    checkpoint: str | None = None
    freeze: bool = True


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation of OpenAI's CLIP towers."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": nn.GELU,
    "quick_gelu": QuickGELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


class Block(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float, eps: float, act: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = MultiHeadAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        hidden = round(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), ACTIVATIONS[act](), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


def sincos_2d(grid: int, width: int) -> Tensor:
    """``(1 + grid**2, width)``: zeros for the class token, then per patch (row-major) sines and
    cosines of its row (first half of the channels) and of its column (second half)."""
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    angles = torch.arange(grid, dtype=torch.float32)[:, None] * freqs[None]  # (grid, quarter)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, width / 2)
    rows = axis[:, None, :].expand(grid, grid, -1)
    cols = axis[None, :, :].expand(grid, grid, -1)
    patches = torch.cat([rows, cols], dim=-1).reshape(grid * grid, width)
    return torch.cat([torch.zeros(1, width), patches])


def _stem(config: ViTConfig) -> nn.Module:
    """Image ``(B, 3, H, W)`` to patch embeddings ``(B, width, H / patch, W / patch)``."""
    if config.stem == "patch":
        return nn.Conv2d(3, config.width, config.patch_size, config.patch_size, bias=config.patch_bias)
    steps = config.patch_size.bit_length() - 1
    if config.stem == "conv" and config.patch_bias:
        raise ConfigError("encoder.patch_bias is for stem='patch' (the conv stem has its own biases)")
    if config.stem != "conv" or 2**steps != config.patch_size:
        raise ConfigError(
            f"encoder.stem must be 'patch' or 'conv' (with a power-of-two patch_size), got "
            f"stem={config.stem!r}, patch_size={config.patch_size}"
        )
    layers: list[nn.Module] = []
    channels = 3
    for i in range(steps):  # widths width/2^(steps-1) ... width, each halving the resolution
        out = max(config.width >> (steps - 1 - i), 16)
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GELU()]
        channels = out
    layers.append(nn.Conv2d(channels, config.width, 1))
    return nn.Sequential(*layers)


@register_encoder("vit", ViTConfig)
class ViTEncoder(ImageEncoder):
    def __init__(self, config: ViTConfig):
        super().__init__()
        sizes = {k: getattr(config, k) for k in ("image_size", "patch_size", "width", "depth", "num_heads")}
        if min(sizes.values()) < 1:
            raise ConfigError(f"encoder sizes must be positive, got {sizes}")
        if config.image_size % config.patch_size:
            raise ConfigError(
                f"encoder.image_size={config.image_size} is not a multiple of "
                f"encoder.patch_size={config.patch_size}; change one of them"
            )
        if config.width % config.num_heads:
            raise ConfigError(
                f"encoder.width={config.width} is not divisible by encoder.num_heads="
                f"{config.num_heads}; pick a head count that divides the width"
            )
        if config.act not in ACTIVATIONS:
            raise ConfigError(f"encoder.act must be one of {sorted(ACTIVATIONS)}, got {config.act!r}")
        if config.keep_class_token and not config.class_token:
            raise ConfigError(
                "encoder.keep_class_token=true needs a class token, but encoder.class_token=false; "
                "set keep_class_token=false (the features are then the patch tokens)"
            )
        self.config = config
        self.grid = config.image_size // config.patch_size
        self.patch_embed = _stem(config)
        # None: no class token at all (SigLIP), not one computed and dropped.
        self.class_token = (
            nn.Parameter(torch.randn(config.width) * config.width**-0.5) if config.class_token else None
        )
        if config.pos_init not in ("random", "sincos") or (config.pos_init == "sincos" and config.width % 4):
            raise ConfigError(
                f"encoder.pos_init must be 'random' or 'sincos' (with a width divisible by 4), got "
                f"{config.pos_init!r}"
            )
        self.num_prefix = int(config.class_token)  # positions before the patches'
        table = sincos_2d(self.grid, config.width) if config.pos_init == "sincos" else None
        self.pos_embed = nn.Parameter(  # (num_prefix + grid**2, D)
            torch.randn(self.grid**2 + self.num_prefix, config.width) * 0.02
            if table is None
            else table[1 - self.num_prefix :].clone()  # its own storage: safetensors saves no views
        )
        self.norm_pre = (
            nn.LayerNorm(config.width, eps=config.layer_norm_eps) if config.pre_norm else nn.Identity()
        )
        self.blocks = nn.ModuleList(
            Block(config.width, config.num_heads, config.mlp_ratio, config.layer_norm_eps, config.act)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        # Blocks after the selected feature layer never run.
        self.blocks_to_run = resolve_layer(config.feature_layer, config.depth, where="encoder")
        # Weights that never run are kept (checkpoints load whole) but never trained, so DDP
        # does not wait for their gradients.
        self.blocks[self.blocks_to_run :].requires_grad_(False)
        self.norm.requires_grad_(config.final_norm)

        self.feature_dim = config.width
        self.num_tokens = self.grid**2 + int(config.keep_class_token)
        self.image_size = config.image_size
        self.mean, self.std = tuple(config.mean), tuple(config.std)
        if config.checkpoint is not None:
            self._load(config.checkpoint)

    def _load(self, path: str) -> None:
        if not Path(path).is_file():
            raise ConfigError(
                f"encoder.checkpoint {path!r} does not exist; point it at a .safetensors file "
                "of ViT weights, or set it to null for random initialisation"
            )
        self.load_state_dict(load_file(path))

    def _positions(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings, resized bicubically when the image is not ``image_size``."""
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[: self.num_prefix], self.pos_embed[self.num_prefix :]
        patch_pos = patch_pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)[0]])

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embed(pixels)  # (B, D, h, w)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        if self.class_token is not None:
            cls = self.class_token.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + h*w, D)
        x = self.norm_pre(x + self._positions(grid_h, grid_w).to(x.dtype))
        for block in self.blocks[: self.blocks_to_run]:
            x = block(x)
        if self.config.final_norm:
            x = self.norm(x)
        return x if self.config.keep_class_token else x[:, self.num_prefix :]
