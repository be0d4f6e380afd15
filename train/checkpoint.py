"""Training checkpoints: trainable weights, optimizer, schedule, RNG states, data position.

Each checkpoint is written into a temporary directory, flushed to disk and renamed into place,
so a kill during a save never damages the last good one; only the last ``keep`` are kept. A
disk that fills during a save (``ENOSPC``) leaves the last good one too: the partial directory
is removed and :class:`CheckpointSpaceError` says where and how much space the save needs.

``state.pt`` holds tensors and plain values only (RNG states as tensors) and is read with
``torch.load(weights_only=True)``: a checkpoint from someone else cannot run code on resume.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

PREFIX = "ckpt-"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


class CheckpointSpaceError(OSError):
    """A checkpoint that did not fit on its disk: the message names the directory, the space it
    needs and the checkpoint a resume continues from."""

    def __str__(self) -> str:
        return self.strerror


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (loadable with ``weights_only=True``)."""
    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "gauss": [has_gauss, cached],
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], *numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (directories being written or deleted are not listed)."""
    return sorted(
        p for p in Path(run_dir).glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()
    )


def _fsync(path: Path) -> None:
    """Flushes a file (or a directory's entries) to disk: the rename that follows must not
    reach the disk before the data it makes visible."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Renames, then deletes: a kill halfway through never leaves half a checkpoint listed."""
    doomed = path.with_name(path.name + ".del")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 has sharded the model's parameters (into DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_options(**kwargs):
    return StateDictOptions(full_state_dict=True, **kwargs)


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The full trainable weights and optimizer state. Under FSDP2 this is a collective every
    rank must join; the full tensors land on rank 0's CPU."""
    if not is_sharded(model):
        return trainable_state(model), optimizer.state_dict()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    optim = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    return {n: t.contiguous() for n, t in weights.items() if n in names}, optim


def gather_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of a sharded model, full size, on rank 0's CPU (a collective)."""
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
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(f"{PREFIX}*.*"):  # left by a run killed while saving or pruning
        shutil.rmtree(stale, ignore_errors=True)
    needed = nbytes(weights) + nbytes(optim)
    if shutil.disk_usage(run_dir).free < needed:  # nothing written: no partial checkpoint
        raise _space_error(run_dir, final, needed)
    try:
        tmp.mkdir(parents=True)
        save_file(weights, tmp / WEIGHTS)
        torch.save(
            {
                "step": step,
                "optimizer": optim,
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                **state,
            },
            tmp / STATE,
        )
        for file in (tmp / WEIGHTS, tmp / STATE, tmp):
            _fsync(file)
    except Exception as err:
        full = _out_of_space(err) or shutil.disk_usage(run_dir).free < 2**20
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        raise _space_error(run_dir, final, needed) from None
    if final.exists():  # a re-save of the same step replaces it
        _remove(final)
    tmp.rename(final)
    _fsync(run_dir)
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        _remove(old)
    return final


def nbytes(tree: Any) -> int:
    """The bytes of the tensors in a nested dict / list (a checkpoint's size, near enough)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(nbytes(v) for v in tree)
    return 0


def _out_of_space(err: BaseException | None) -> bool:
    """Whether a failed write ran out of space: an OSError with ENOSPC / EDQUOT, itself or what
    it was raised from, or its text (safetensors keeps only that). torch.save's own writer says
    neither, hence the look at the free space in :func:`save_checkpoint` as well."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _space_error(run_dir: Path, final: Path, needed: int) -> CheckpointSpaceError:
    free = shutil.disk_usage(run_dir).free
    previous = [p for p in checkpoints(run_dir) if p != final]
    resume = (
        f"--resume continues from {previous[-1]}"
        if previous
        else "there is no earlier checkpoint to resume from"
    )
    return CheckpointSpaceError(
        errno.ENOSPC,
        f"no space left on the device to write the checkpoint {final}: it needs about "
        f"{_mb(needed)}, {_mb(free)} is free in {run_dir}. The partial checkpoint was removed; "
        f"free space there (or set run.out elsewhere, or lower run.keep_last), then {resume}",
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Restores weights (and optimizer, schedule, RNG states when given); returns the state dict."""
    path = Path(path)
    weights = _read(path / WEIGHTS, load_file)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in weights]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks trainable weights {missing[:3]}; was the recipe changed?"
        )
    state = _read(path / STATE, lambda file: torch.load(file, weights_only=True))
    if is_sharded(model):
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


def _read(file: Path, load) -> Any:
    """``load(file)``, with one clear message for a missing, damaged or unsafe file."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete; delete {file.parent}")
    try:
        return load(file)
    except pickle.UnpicklingError as err:  # weights_only refused an object that could run code
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = (
            f"it calls {found.group(1)}" if found else "it holds objects other than tensors and plain values"
        )
        raise CheckpointError(
            f"refusing to load {file}: {what}, which could run code. vlm's checkpoints hold tensors and "
            "plain values only; resume only from checkpoints vlm wrote"
        ) from None
    except (SafetensorError, RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"{file} is damaged ({type(err).__name__}: {err}); delete {file.parent} to resume from "
            "the checkpoint before it"
        ) from None
