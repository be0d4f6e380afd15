"""``vlm bench --profile MODEL``: torch.profiler's top operators of one model's training steps.

The steps are ``vlm bench``'s (same weights on both sides, the optimizer transformers' Trainer
builds), connector-trainable then fully trainable, for vlm and for transformers: where the time
goes, operator by operator, so that a change can aim at what costs the most.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from vlm.eval.bench import SIZES, prepared_pair, set_trainable, train_step, training_optimizer
from vlm.eval.bench_common import device_name, pick_device


def profile_tables(
    name: str, size: str = "small", device: str = "cpu", *, steps: int = 3, rows: int = 15
) -> dict[str, str]:
    """``"<side>, <which> trainable"`` -> the profiler's table of ``steps`` steps (after two
    warm-up steps), sorted by self time."""
    dev = pick_device(device)
    spec = SIZES[size]
    hf_model, model, _, batch = prepared_pair(name, spec, dev)
    inputs = {"vlm": (model, batch.ours), "transformers": (hf_model, batch.hf)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for which in ("connector", "full"):
        for side, (m, side_inputs) in inputs.items():
            params = set_trainable(name, m, which, ours=side == "vlm")
            step = train_step(
                m,
                side_inputs,
                batch.labels,
                training_optimizer(params),
                ours=side == "vlm",
                dtype=getattr(torch, spec.dtype),
            )
            for _ in range(2):
                step()
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    step()
            tables[f"{side}, {which} trainable"] = prof.key_averages().table(sort_by=sort, row_limit=rows)
    return tables


def run(name: str, size: str = "small", device: str = "cpu", out: str | Path = "runs/bench") -> Path:
    """Writes ``profile-<model>-<device>.md``: every table, with the versions."""
    tables = profile_tables(name, size, device)
    dev = pick_device(device)
    lines = [
        f"# Training-step profile: {name}, size `{size}`, {device_name(dev)}",
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}; torch.profiler over "
        "3 steps after 2 warm-up steps, top operators by self time (`vlm bench --profile`).",
    ]
    for title, table in tables.items():
        lines += ["", f"## {title}", "", "```", table.rstrip(), "```"]
    path = Path(out) / f"profile-{name}-{device_name(dev).replace(' ', '-').lower()}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
