"""AdamW without weight decay on norms, biases and gates; linear warmup then cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from vlm.train.recipe import OptimConfig


def make_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; tensors under 2-D (norm weights, biases, gates)
    get no weight decay.

    The fused kernel (one pass over all tensors, on the CPU too: fully trainable steps 1.2x to
    1.7x faster there than with the per-tensor loop, ``vlm bench``'s training rows) unless FSDP2
    has sharded the parameters, where PyTorch's default applies. transformers' Trainer defaults
    to it too.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: every parameter is frozen")
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = not any(isinstance(p, DTensor) for p in trainable) or None
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=tuple(config.betas), fused=fused
    )


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, warmup_steps=config.warmup_steps, max_steps=max_steps, min_ratio=config.min_lr_ratio
        ),
    )
