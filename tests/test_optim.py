"""The trainer's optimizer: fused AdamW, no weight decay on norms, biases and gates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm.train.optim import make_optimizer
from vlm.train.recipe import OptimConfig


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def test_the_optimizer_is_fused_and_steps_as_the_per_tensor_loop_does():
    config = OptimConfig(lr=1e-2, weight_decay=0.1)
    fused_model, loop_model = _model(), _model()
    optimizer = make_optimizer(fused_model, config)
    assert optimizer.defaults["fused"] is True
    loop = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in _groups(loop_model, config)],
        lr=config.lr,
        betas=tuple(config.betas),
    )
    x = torch.randn(32, 8)
    for _ in range(5):
        for model, opt in ((fused_model, optimizer), (loop_model, loop)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def test_norms_and_biases_get_no_weight_decay():
    model = _model()
    optimizer = make_optimizer(model, OptimConfig(weight_decay=0.1))
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model[0].weight)] == 0.1 and decay[id(model[2].weight)] == 0.1
    assert decay[id(model[0].bias)] == decay[id(model[1].weight)] == 0.0


def test_a_fully_frozen_model_is_refused():
    model = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        make_optimizer(model, OptimConfig())
