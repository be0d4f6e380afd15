"""``vlm bench --convert``: the memory that converting a transformers checkpoint costs.

A LLaVA checkpoint (CLIP tower, Llama decoder of about 200M parameters) is saved by
transformers in bfloat16, as published checkpoints are; then a fresh process loads it with
``vlm.from_pretrained`` and reports its peak resident memory above what the imports took, as a
multiple of the checkpoint's size on disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vlm.convert import FORMATS, IMAGE_TOKEN_ID, Size
from vlm.eval.bench import SIZES
from vlm.eval.bench_common import device_name, pick_device, write_report

#: The checkpoint measured: the ``small`` benchmark's vision tower, a wider and deeper Llama.
SIZE = replace(SIZES["small"], text_width=1024, text_depth=12, text_heads=16, text_kv_heads=4, text_ffn=2816)

# The peak comes from /proc (VmHWM, this process's own high-water mark): getrusage's ru_maxrss
# carries the parent's peak across fork and exec.
_MEASURE = """
import json, sys, time
import torch, vlm
# transformers imports its model code lazily: import what loading uses before the baseline.
import transformers.models.llama.modeling_llama, transformers.models.llava.modeling_llava
import vlm.convert, vlm.hub

def high_water_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

before = high_water_kib()
start = time.perf_counter()
model = vlm.from_pretrained(sys.argv[1]).eval()
seconds = time.perf_counter() - start
# One forward pass reads every weight, so weights still mapped from the file count too.
ids = torch.tensor([[1] + [model.image_token_id] * model.tokens_per_image + [5, 6, 7]])
size = model.encoder.image_size
with torch.no_grad():
    model(input_ids=ids, pixel_values=torch.randn(1, 3, size, size))
dtypes = sorted({str(p.dtype) for p in model.parameters()})
print(json.dumps({"peak_kib": high_water_kib() - before, "seconds": seconds, "dtypes": dtypes}))
"""


def write_checkpoint(path: Path, size: Size = SIZE, image_token_id: int = IMAGE_TOKEN_ID) -> int:
    """Saves a LLaVA checkpoint in bfloat16; returns its size in bytes."""
    torch.manual_seed(0)
    FORMATS["llava"].save_reference(size, path, image_token_id=image_token_id, dtype=torch.bfloat16)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure(path: Path) -> dict[str, Any]:
    """Peak memory of ``vlm.from_pretrained(path)`` in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(out: str | Path = "runs/bench") -> Path:
    """Measures and writes ``convert-<device>.json`` under ``out``; returns its path."""
    with tempfile.TemporaryDirectory() as tmp:
        size = write_checkpoint(Path(tmp))
        result = measure(Path(tmp))
    result = {
        "device": device_name(pick_device("cpu")),  # loading happens in the CPU's memory
        "checkpoint_bytes": size,
        "peak_bytes": result["peak_kib"] * 1024,
        "ratio": result["peak_kib"] * 1024 / size,
        "seconds": result["seconds"],
        "dtypes": result["dtypes"],
    }
    return write_report(result, out, "convert")  # a single figure: no markdown table


if __name__ == "__main__":
    print(run(sys.argv[1] if len(sys.argv) > 1 else "runs/bench").read_text())
