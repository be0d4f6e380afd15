"""``vlm bench --options``: what vlm's own speed options buy, each against the run without it.

- Packed turns (``data.pack_turns``): one shared image prefix per sample instead of one
  sequence per example. Measured as labelled answer tokens per second of training on the shapes
  recipe (one shard), each run a ``vlm train`` process of its own (eval does not import train).
- Packed samples (``data.pack_length``): several examples per row, each attending to itself
  only, instead of one per row padded to the batch's longest. Measured the same way, with and
  without packed turns.
- The frozen-feature cache (``run.cache_features``): the frozen encoder runs once per image
  before training instead of at every step. Measured the same way, with the encoder frozen.
- Generation with more images: the cost of one new token with 1 and with 4 images in the
  prompt (LLaVA and IDEFICS shapes of the ``small`` benchmark). With the KV cache the images
  are processed once, so the per-token cost should barely move.
- Generation caches: tokens/s (LLaVA ``small``, batch 16, 64 new tokens) with the dynamic KV
  cache, a static one, and a static one with the new-token step compiled (``torch.compile``;
  its one-off compile time is reported apart).

Timings are medians of interleaved rounds (:func:`vlm.eval.bench_common.race`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from vlm.data.shapes import write_shapes
from vlm.eval.bench import SIZES, make_inputs, model_pair
from vlm.eval.bench_common import device_name, pick_device, race, time_call, write_report
from vlm.generate import generate

# A resource of the installed package, read as a file: no import of vlm.train.
SHAPES_RECIPE = Path(str(files("vlm.train") / "recipes" / "shapes.toml"))

# Each variant: recipe overrides on top of the shapes recipe, and the variant it is compared with.
TRAINING_VARIANTS = {
    "one sequence per example": (["data.pack_turns=false", "data.pack_length=0"], None),
    "packed samples": (["data.pack_turns=false", "data.pack_length=160"], "one sequence per example"),
    "packed turns": (["data.pack_turns=true", "data.pack_length=0"], "one sequence per example"),
    "packed turns and samples": (["data.pack_turns=true", "data.pack_length=160"], "packed turns"),
    "frozen encoder, from pixels": (
        ["data.pack_turns=true", "data.pack_length=0", "model.encoder.freeze=true"],
        None,
    ),
    "frozen encoder, feature cache": (
        [
            "data.pack_turns=true",
            "data.pack_length=0",
            "model.encoder.freeze=true",
            "run.cache_features=true",
        ],
        "frozen encoder, from pixels",
    ),
}


def train_run(run_dir: Path, overrides: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Trains the shapes recipe with ``overrides`` in a ``vlm train`` process writing to
    ``run_dir``; returns the run's ``summary.json`` and the records of its ``log.jsonl``."""
    command = [sys.executable, "-m", "vlm.cli", "train", str(SHAPES_RECIPE)]
    for override in [f"run.out={json.dumps(str(run_dir))}", *overrides]:
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-4000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    with (run_dir / "log.jsonl").open() as lines:
        return summary, [json.loads(line) for line in lines]


def training_rows(steps: int, shapes: str, device: str | torch.device = "auto") -> list[dict[str, Any]]:
    """Answer tokens/s of short shapes-recipe runs, one per variant (same seed, same shard).

    Args:
        shapes: a shapes dataset directory (``vlm data shapes``).
    """
    target = str(pick_device(device))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (overrides, _) in TRAINING_VARIANTS.items():
            common = [
                'data.shapes=""',  # read the given dataset as it is: never regenerate it
                f"data.train={json.dumps(str(Path(shapes) / 'train' / 'shapes-train-000000.tar'))}",
                f"data.tokenizer={json.dumps(str(Path(shapes) / 'tokenizer'))}",
                f"data.val={json.dumps(str(Path(shapes) / 'val'))}",
                f"run.max_steps={steps}",
                f"run.save_every={steps * 10}",
                f"run.device={json.dumps(target)}",
            ]
            run_dir = Path(tmp) / name.replace(" ", "-").replace(",", "")
            summary, log = train_run(run_dir, common + overrides)
            # The trainer's own clock (its training loop): the process's start-up does not count.
            tokens = sum(r["tokens"] for r in log if "tokens" in r)
            rows.append({"variant": name, "answer_tokens_per_s": tokens / summary["train_seconds"]})
    by_name = {r["variant"]: r["answer_tokens_per_s"] for r in rows}
    for row in rows:
        baseline = TRAINING_VARIANTS[row["variant"]][1]
        if baseline:
            row["versus"] = baseline
            row["ratio"] = row["answer_tokens_per_s"] / by_name[baseline]
    return rows


def _multi_image_prompt(model, name: str, images: int, size, device: torch.device) -> dict[str, torch.Tensor]:
    """One row: ``images`` copies of an image, each followed by a little text, then the text of
    a one-image prompt."""
    prompt = make_inputs(name, model, size, 1, answer=0, seed=images)
    ids = prompt.ours["input_ids"]
    image = ids[:, 1 : 1 + model.tokens_per_image]  # the single image's placeholders
    parts = [ids[:, :1]] + [torch.cat([image, ids[:, -4:]], 1) for _ in range(images)]
    return {
        "input_ids": torch.cat(parts, 1).to(device),
        "pixel_values": prompt.ours["pixel_values"].repeat(images, 1, 1, 1).to(device),
    }


def _per_token_seconds(model, name: str, images: int, size, tokens: int, repeats: int, device) -> float:
    """Seconds per new token after the prompt: (time for 1 + tokens) - (time for 1), per token."""
    inputs = _multi_image_prompt(model, name, images, size, device)

    def generating(n: int):
        return lambda: generate(model, **inputs, max_new_tokens=n)

    seconds = race({"short": generating(1), "long": generating(1 + tokens)}, device, iters=repeats)
    return (seconds["long"] - seconds["short"]) / tokens


def image_scaling_rows(
    size: str = "small", tokens: int = 32, repeats: int = 3, device: str | torch.device = "auto"
) -> list[dict[str, Any]]:
    """Per-token generation cost with 1 and with 4 images in the prompt, LLaVA and IDEFICS."""
    spec, dev = SIZES[size], pick_device(device)
    rows = []
    for name in ("llava", "idefics"):  # a prefix bridge and a cross-attention one
        with tempfile.TemporaryDirectory() as tmp:
            _, model, _ = model_pair(name, spec, Path(tmp))
        model.to(dev).eval()
        one, four = (_per_token_seconds(model, name, n, spec, tokens, repeats, dev) for n in (1, 4))
        rows.append(
            {
                "model": name,
                "ms_per_token_1_image": one * 1e3,
                "ms_per_token_4_images": four * 1e3,
                "ratio": four / one,
            }
        )
    return rows


def cache_rows(
    size: str = "small",
    rows: int = 16,
    tokens: int = 64,
    compile: bool = True,
    device: str | torch.device = "auto",
) -> list[dict[str, Any]]:
    """Generation tokens/s with the dynamic KV cache, a static one, and (``compile``) a static one
    with the new-token step compiled, each over the dynamic cache's."""
    spec, dev = SIZES[size], pick_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        _, model, _ = model_pair("llava", spec, Path(tmp))
    model.to(dev).eval()
    prompt = {k: v.to(dev) for k, v in make_inputs("llava", model, spec, rows, answer=0, seed=1).ours.items()}

    def generating(options: dict[str, Any]):
        return lambda: generate(model, **prompt, max_new_tokens=tokens, **options)

    variants = {"dynamic cache": {}, "static cache": {"cache": "static"}}
    first_call = None
    if compile:
        variants["static cache, compiled step"] = {"cache": "static", "compile": True}
        # Its first call compiles: timed on its own, before the race (which warms up the others).
        first_call = time_call(generating(variants["static cache, compiled step"]), dev)
    seconds = race({name: generating(o) for name, o in variants.items()}, dev, iters=3)
    results = [{"variant": name, "tokens_per_s": rows * tokens / s} for name, s in seconds.items()]
    if first_call is not None:
        results[-1]["first_call_seconds"] = first_call
    for r in results:
        r["ratio"] = r["tokens_per_s"] / results[0]["tokens_per_s"]
    return results


def run(
    out: str | Path = "runs/bench",
    steps: int = 40,
    shapes: str = "runs/shapes-data",
    device: str = "auto",
) -> Path:
    """Runs every measurement on ``device`` and writes ``options-<device>.json`` and ``.md``
    under ``out``; returns the JSON file's path."""
    dev = pick_device(device)
    write_shapes(shapes)  # a no-op when the default dataset is already there
    results = {
        "device": device_name(dev),
        "training": training_rows(steps, shapes, dev),
        "generation_vs_images": image_scaling_rows(device=dev),
        "generation_caches": cache_rows(device=dev),
    }
    return write_report(results, out, "options", markdown)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# What vlm's speed options buy, on {results['device']}",
        "",
        "Training the shapes recipe (one shard), labelled answer tokens per second:",
        "",
        "| variant | answer tokens/s | versus | ratio |",
        "|---|---:|---|---:|",
    ]
    for r in results["training"]:
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        lines.append(f"| {r['variant']} | {r['answer_tokens_per_s']:.0f} | {r.get('versus', '')} | {ratio} |")
    lines += [
        "",
        "Generation, cost of one new token with 1 and 4 images in the prompt (size `small`):",
        "",
        "| model | ms/token, 1 image | ms/token, 4 images | ratio |",
        "|---|---:|---:|---:|",
    ]
    for r in results["generation_vs_images"]:
        lines.append(
            f"| {r['model']} | {r['ms_per_token_1_image']:.2f} | {r['ms_per_token_4_images']:.2f} "
            f"| {r['ratio']:.2f} |"
        )
    lines += [
        "",
        "Generation caches, LLaVA `small`, batch 16, 64 new tokens:",
        "",
        "| variant | tokens/s | ratio |",
        "|---|---:|---:|",
    ]
    for r in results["generation_caches"]:
        first = f" (first call {r['first_call_seconds']:.0f} s)" if "first_call_seconds" in r else ""
        lines.append(f"| {r['variant']}{first} | {r['tokens_per_s']:.0f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"
