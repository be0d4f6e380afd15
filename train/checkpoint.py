"""Training checkpoints: trainable weights, optimizer, schedule, RNG states, data position.

Each checkpoint is written into a temporary directory and renamed into place, so a crash
during a save never damages the last good one; only the last ``keep`` are kept.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

PREFIX = "ckpt-"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are not listed)."""
    return sorted(p for p in Path(run_dir).glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 has sharded the model's parameters (into DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The full trainable weights and optimizer state. Under FSDP2 this is a collective every
    rank must join; the full tensors land on rank 0's CPU."""
    if not is_sharded(model):
        return trainable_state(model), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    optim = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    return {n: t.contiguous() for n, t in weights.items() if n in names}, optim


def gather_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of a sharded model, full size, on rank 0's CPU (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {
        n: t.contiguous()
        for n, t in get_model_state_dict(model, options=_full_options(cpu_offload=True)).items()
    }


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int = 2,
    write: bool = True,
) -> Path | None:
    """Writes ``run_dir/ckpt-<step>`` atomically and prunes to the last ``keep``.

    Every rank calls it (FSDP2 gathers shards); only the one with ``write`` writes.
    """
    weights, optim = gather_state(model, optimizer)
    if not write:
        return None
    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{step:08d}"
    tmp = run_dir / f"{PREFIX}{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, tmp / "trainable.safetensors")
    torch.save(
        {"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng_state(), **state},
        tmp / "state.pt",
    )
    if final.exists():  # a re-save of the same step replaces it
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Restores weights (and optimizer, schedule, RNG states when given); returns the state dict."""
    path = Path(path)
    weights = load_file(path / "trainable.safetensors")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable weights {missing[:3]}; was the recipe changed?")
    state = torch.load(path / "state.pt", weights_only=False)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(model, weights, options=_full_options(strict=False))
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_full_options())
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
