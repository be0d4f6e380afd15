"""Run logs: ``log.jsonl`` (one JSON object per optimizer step), TensorBoard scalars, a loss curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no display backend, no global figure state
from torch.utils.tensorboard import SummaryWriter

LOG_FILE = "log.jsonl"


class RunLog:
    """Appends step records to ``run_dir/log.jsonl`` and TensorBoard (main process only)."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, resume_step: int | None = None):
        self.path = run_dir / LOG_FILE
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run rewrites the steps after its checkpoint, so the log reads as one run.
        keep = [r for r in read_log(self.path) if resume_step is not None and r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The step records; a last line cut short by a killed process is left out."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):  # only the last write can have been cut
                raise
    return records


def plot_loss(log_path: Path, png_path: Path) -> None:
    """Loss (and its moving average) against step, as a PNG."""
    records = [r for r in read_log(log_path) if "loss" in r]
    if not records:
        return
    steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    ax.plot(steps, losses, color="#9db4d8", linewidth=1, label="loss")
    ax.plot(steps, smooth, color="#1f4e9c", linewidth=2, label=f"moving average ({window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
