"""``vlm bench --options``: what vlm's own speed options buy, each against the run without it.

- Packed turns (``data.pack_turns``): one shared image prefix per sample instead of one
  sequence per example. Measured as labelled answer tokens per second of training on the shapes
  recipe (one shard).
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
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vlm.eval.bench import SIZES, device_name, make_inputs, model_pair
from vlm.eval.bench import sync as bench_sync
from vlm.generate import generate

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


def training_rows(steps: int, shapes: str) -> list[dict[str, Any]]:
    """Answer tokens/s of short shapes-recipe runs, one per variant (same seed, same shard).

    Args:
        shapes: a shapes dataset directory (``vlm data shapes``).
    """
    from importlib.resources import files

    from vlm.train.recipe import load_recipe
    from vlm.train.trainer import train

    recipe_path = Path(str(files("vlm.train") / "recipes" / "shapes.toml"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (overrides, _) in TRAINING_VARIANTS.items():
            common = [
                'data.shapes=""',  # read the given dataset as it is: never regenerate it
                f"data.train={json.dumps(str(Path(shapes) / 'train' / 'shapes-train-000000.tar'))}",
                f"data.tokenizer={json.dumps(str(Path(shapes) / 'tokenizer'))}",
                f"data.val={json.dumps(str(Path(shapes) / 'val'))}",
                f"run.out={json.dumps(str(Path(tmp) / name.replace(' ', '-').replace(',', '')))}",
                f"run.max_steps={steps}",
                f"run.save_every={steps * 10}",
            ]
            recipe = load_recipe(recipe_path, common + overrides)
            summary = train(recipe, progress=False)
            log = [json.loads(line) for line in (Path(summary["run_dir"]) / "log.jsonl").open()]
            tokens = sum(r["tokens"] for r in log if "tokens" in r)
            rows.append({"variant": name, "answer_tokens_per_s": tokens / summary["train_seconds"]})
    by_name = {r["variant"]: r["answer_tokens_per_s"] for r in rows}
    for row in rows:
        baseline = TRAINING_VARIANTS[row["variant"]][1]
        if baseline:
            row["versus"] = baseline
            row["ratio"] = row["answer_tokens_per_s"] / by_name[baseline]
    return rows


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    bench_sync(_device())


def _best_seconds(run, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``run()``."""
    best = float("inf")
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        run()
        _sync()
        best = min(best, time.perf_counter() - start)
    return best


def _per_token_seconds(model, name: str, images: int, size, tokens: int, repeats: int) -> float:
    """Seconds per new token after the prompt: (time for 1 + tokens) - (time for 1), per token."""
    prompt = make_inputs(name, model, size, 1, answer=0, seed=images)
    ids = prompt.ours["input_ids"]
    image = ids[:, 1 : 1 + model.tokens_per_image]  # the single image's placeholders
    # ``images`` images, each followed by a little text, then the original prompt's text.
    parts = [ids[:, :1]] + [torch.cat([image, ids[:, -4:]], 1) for _ in range(images)]
    inputs = {
        "input_ids": torch.cat(parts, 1).to(_device()),
        "pixel_values": prompt.ours["pixel_values"].repeat(images, 1, 1, 1).to(_device()),
    }

    def timed(n: int) -> float:
        return _best_seconds(lambda: generate(model, **inputs, max_new_tokens=n), repeats)

    timed(2)  # warm-up
    return (timed(1 + tokens) - timed(1)) / tokens


def image_scaling_rows(size: str = "small", tokens: int = 32, repeats: int = 3) -> list[dict[str, Any]]:
    size = SIZES[size]
    rows = []
    for name in ("llava", "idefics"):
        with tempfile.TemporaryDirectory() as tmp:
            _, model, _ = model_pair(name, size, Path(tmp))
        model.to(_device()).eval()
        one, four = (_per_token_seconds(model, name, n, size, tokens, repeats) for n in (1, 4))
        rows.append(
            {
                "model": name,
                "ms_per_token_1_image": one * 1e3,
                "ms_per_token_4_images": four * 1e3,
                "ratio": four / one,
            }
        )
    return rows


def cache_rows(size: str = "small", rows: int = 16, tokens: int = 64, compile: bool = True) -> list[dict]:
    spec = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        _, model, _ = model_pair("llava", spec, Path(tmp))
    model.to(_device()).eval()
    prompt = {
        k: v.to(_device()) for k, v in make_inputs("llava", model, spec, rows, answer=0, seed=1).ours.items()
    }

    def tokens_per_s(**options) -> float:
        return (
            rows
            * tokens
            / _best_seconds(lambda: generate(model, **prompt, max_new_tokens=tokens, **options), 3)
        )

    variants = {"dynamic cache": {}, "static cache": {"cache": "static"}}
    results = [{"variant": name, "tokens_per_s": tokens_per_s(**o)} for name, o in variants.items()]
    if compile:
        start = time.perf_counter()
        generate(model, **prompt, max_new_tokens=tokens, cache="static", compile=True)
        compile_s = time.perf_counter() - start
        results.append(
            {
                "variant": "static cache, compiled step",
                "tokens_per_s": tokens_per_s(cache="static", compile=True),
                "first_call_seconds": compile_s,
            }
        )
    for r in results:
        r["ratio"] = r["tokens_per_s"] / results[0]["tokens_per_s"]
    return results


def run(out: str | Path = "eval/results", steps: int = 40, shapes: str = "runs/shapes-data") -> Path:
    from vlm.data.shapes import write_shapes

    write_shapes(shapes)  # a no-op when the default dataset is already there
    results = {
        "device": device_name(_device()),
        "training": training_rows(steps, shapes),
        "generation_vs_images": image_scaling_rows(),
        "generation_caches": cache_rows(),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"options-{results['device'].replace(' ', '-').lower()}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(results))
    return path


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
