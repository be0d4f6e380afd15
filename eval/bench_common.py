"""What the benchmarks share: the device, the timing, the result files.

- :func:`pick_device` turns ``--device`` into a device (``"auto"``: CUDA when present);
- :func:`race` times callables in interleaved rounds and gives each one's median
  (:func:`race_rounds`: every round's time; :func:`spread`: the round-by-round ratios' range);
- :func:`step_flops` counts a step's FLOPs, :data:`PEAK_FLOPS` the GPUs' peaks for MFU;
- :func:`write_report` writes ``<stem>-<device>.json`` and its markdown table beside it, so that
  every benchmark's files are named after the machine they ran on.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; anything else as ``torch.device`` reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture and thread count: what a result file is named after."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA runs asynchronously; a timer must not stop early)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``, the device's work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def race_rounds(
    calls: Mapping[str, Callable[[], Any]], device: torch.device, *, warmup: int = 1, iters: int = 3
) -> dict[str, list[float]]:
    """Seconds of each callable in every timed round, the rounds interleaved (a, b, a, b, ...)
    after ``warmup`` untimed ones: drift (clocks, caches, other load) hits every callable alike,
    and round ``i`` of one callable pairs with round ``i`` of another."""
    times: dict[str, list[float]] = {key: [] for key in calls}
    for i in range(warmup + iters):
        for key, fn in calls.items():
            seconds = time_call(fn, device)
            if i >= warmup:
                times[key].append(seconds)
    return times


def race(
    calls: Mapping[str, Callable[[], Any]], device: torch.device, *, warmup: int = 1, iters: int = 3
) -> dict[str, float]:
    """Median seconds of each callable over :func:`race_rounds` (the median ignores the odd slow
    round)."""
    return {
        key: statistics.median(v) for key, v in race_rounds(calls, device, warmup=warmup, iters=iters).items()
    }


def spread(numerator: list[float], denominator: list[float]) -> list[float]:
    """``[min, median, max]`` of the round-by-round ratios ``numerator[i] / denominator[i]``: how
    far one round's ratio moves, the noise a single figure hides."""
    ratios = sorted(n / d for n, d in zip(numerator, denominator))
    return [ratios[0], statistics.median(ratios), ratios[-1]]


#: Dense bf16 tensor-core peaks (FLOP/s) of the GPUs this project may be lent, for MFU.
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step``, counted by PyTorch's ``FlopCounterMode`` (matmuls and
    attention, forward and backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def write_report(
    results: dict[str, Any],
    out: str | Path,
    stem: str,
    markdown: Callable[[dict[str, Any]], str] | None = None,
) -> Path:
    """Writes ``results`` (which name their ``"device"``) to ``out/<stem>-<device>.json`` and, given
    ``markdown``, its table to the ``.md`` beside it; returns the JSON file's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}-{results['device'].replace(' ', '-').lower()}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown(results))
    return path
