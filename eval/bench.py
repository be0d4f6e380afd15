"""``vlm bench``: vlm against transformers' own LLaVA, BLIP-2 and IDEFICS, same weights, one process.

Each registered format (:data:`vlm.convert.FORMATS`) builds transformers' model with random
weights, saves it, and vlm loads it through the format's converter, so both sides compute with
identical weights. Before any timing, both must give the same logits and the same loss (the
correctness guard). Then, with measurements interleaved so that drift hits both sides alike:

- a training step (forward, backward, and the AdamW transformers' Trainer builds by default,
  fused, as vlm's trainer's) with only the connector trainable, then with everything trainable;
- greedy generation of ``gen_tokens`` new tokens at batch 1 and batch 16, with each library's
  defaults and then with both at their fastest (static cache, compiled step);
- on CUDA, the peak memory of a full training step;
- the training loss alone: vlm's cross-entropy against ``F.cross_entropy``;
- the data loader (:mod:`vlm.eval.bench_loader`): images/s from shards to batched pixels against
  a minimal webdataset + torchvision pipeline, and the workers a ``large`` stage-1 step needs.

Every row's ``ratio`` is vlm's speed over the other side's (above 1: vlm is faster); for memory,
transformers' peak over vlm's. ``ratio_spread`` is the range of the round-by-round ratios.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import PIL
import torch
import torch.nn.functional as F
import torchvision
import transformers
from torch import nn
from tqdm import tqdm

import vlm
from vlm.convert import FORMATS, IMAGE_TOKEN_ID, Size
from vlm.convert.registry import probe_images
from vlm.eval import bench_loader
from vlm.eval.bench_common import (
    PEAK_FLOPS,
    device_name,
    pick_device,
    race_rounds,
    spread,
    step_flops,
    write_report,
)
from vlm.generate import generate
from vlm.loss import IGNORE_INDEX, cross_entropy

MODELS = tuple(FORMATS)  # every registered checkpoint format

SIZES = {
    # A few seconds: the tests' size.
    "tiny": Size(32, 8, 32, 2, 2, 64, 2, 4, 2, 128, 512, 4, 2, 2, 6, 6, 8, init_range=0.2),
    # The CPU default: a few minutes for all three models.
    "small": Size(112, 14, 192, 4, 4, 256, 4, 4, 2, 704, 32000, 16, 2, 4, 24, 24, 64),
    # A GPU: CLIP ViT-L/14-336 shapes and a ~1B-parameter Llama-shaped decoder in bf16.
    "large": Size(336, 14, 1024, 24, 16, 2048, 16, 32, 8, 8192, 32000, 64, 6, 16, 32, 96, 64, "bfloat16"),
}


def model_pair(name: str, size: Size, directory: Path) -> tuple[nn.Module, vlm.VisionLanguageModel, int]:
    """transformers' model (built by the format's reference builder) and vlm's conversion of its
    saved checkpoint, in float32 on the CPU."""
    hf_model = FORMATS[name].save_reference(size, directory, image_token_id=IMAGE_TOKEN_ID)
    return hf_model, vlm.from_pretrained(directory), IMAGE_TOKEN_ID


# --- inputs ------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """One batch in both layouts: ``hf`` for transformers' model, ``ours`` for vlm's."""

    hf: dict[str, torch.Tensor]
    ours: dict[str, torch.Tensor]
    labels: torch.Tensor


def make_inputs(
    name: str, model: vlm.VisionLanguageModel, size: Size, rows: int, *, answer: int, seed: int = 0
):
    """``rows`` prompts of one image each (no padding; its tiles where the model tiles images),
    then ``answer`` labelled tokens."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(5, size.vocab, (rows, size.prompt + answer), generator=g)
    images, placeholders = probe_images(model, rows, generator=g)
    image = torch.full((rows, placeholders), model.image_token_id)
    ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
    mask = torch.ones_like(ids)
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < ids.shape[1] - answer, -100)
    ours = dict(input_ids=ids, attention_mask=mask, **images)
    return Inputs(FORMATS[name].hf_inputs(ours, model.image_token_id), ours, labels)


# --- measurements ------------------------------------------------------------------------------


def set_trainable(name: str, model: nn.Module, which: str, *, ours: bool) -> list[nn.Parameter]:
    """Makes the connector (``which="connector"``) or everything (``"full"``) trainable."""
    model.requires_grad_(which == "full")
    if which == "connector":
        # vlm's bridge is the connector; transformers' model names its parts in the format.
        connector = [model.bridge] if ours else FORMATS[name].connector_of(model)
        for part in connector:
            part.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def training_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer transformers' ``Trainer`` builds by default (fused AdamW, in this version),
    on both sides: vlm's trainer uses fused AdamW too (``vlm.train.optim``)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(output_dir=tmp, learning_rate=1e-5, report_to=[])
    cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args)
    return cls(params, **kwargs)


def train_step(
    model, inputs: dict, labels, optimizer, *, ours: bool, dtype: torch.dtype
) -> Callable[[], None]:
    device = labels.device
    extra = {"full_logits": False} if ours else {}

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**inputs, labels=labels, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def utilisation(step: Callable[[], None], seconds: float, device: torch.device) -> dict[str, float]:
    """Achieved TFLOP/s of a training step, and the model FLOPs utilisation on a known GPU."""
    achieved = step_flops(step) / seconds
    out = {"vlm_tflops": achieved / 1e12}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        if peak is not None:
            out["vlm_mfu"] = achieved / peak
    return out


def _peak_memory(step: Callable[[], None], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None  # the CPU allocator keeps no peak statistics
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device)


def generation_settings(best: bool) -> dict[str, tuple[dict, dict, int]]:
    """Row suffix -> (vlm's ``generate`` options, transformers' ``generate`` options, warm-up
    rounds). Each library's defaults; with ``best``, also both at their fastest: a static KV
    cache and the new-token step compiled (the first calls compile, so two untimed rounds).
    Both run the LM head at the last prompt position only (``logits_to_keep``) wherever the
    model takes it: vlm always, transformers by itself in ``generate``."""
    settings = {"": ({}, {}, 1)}
    if best:
        # transformers compiles its step by itself on accelerators only; its CompileConfig flag
        # asks for it on every device (its default mode, "reduce-overhead", uses CUDA graphs).
        compile_config = transformers.CompileConfig()
        compile_config._compile_all_devices = True
        settings[", static cache + compile"] = (
            {"cache": "static", "compile": True},
            {"cache_implementation": "static", "compile_config": compile_config},
            2,
        )
    return settings


def check_parity(name: str, hf_model, model, inputs: Inputs, *, atol: float) -> dict[str, float]:
    """The correctness guard: same logits and same loss (also on the answer-only path that
    vlm's training step times), or no race."""
    hf_model.eval(), model.eval()
    with torch.no_grad():
        expected = hf_model(**inputs.hf, labels=inputs.labels)
        got = model(**inputs.ours, labels=inputs.labels)
        timed = model(**inputs.ours, labels=inputs.labels, full_logits=False)
    hf_model.train(), model.train()
    if got.logits.shape != expected.logits.shape:
        raise AssertionError(
            f"{name}: vlm's logits {tuple(got.logits.shape)} and transformers' "
            f"{tuple(expected.logits.shape)} differ in shape"
        )
    logits_diff = (got.logits.float() - expected.logits.float()).abs().max().item()
    loss_diff = max(
        abs(got.loss.item() - expected.loss.item()), abs(timed.loss.item() - expected.loss.item())
    )
    if logits_diff > atol or loss_diff > atol:
        raise AssertionError(
            f"{name}: vlm and transformers disagree (logits max diff {logits_diff:.2e}, loss diff "
            f"{loss_diff:.2e}, tolerance {atol:.0e}); timings would not compare the same model"
        )
    return {"max_logit_diff": logits_diff, "loss_diff": loss_diff}


def prepared_pair(name: str, size: Size, device: torch.device) -> tuple[nn.Module, Any, int, Inputs]:
    """Both models on ``device`` (seeded weights), the image token, and one training batch in
    both layouts on ``device``."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model, model, image_id = model_pair(name, size, Path(tmp))
    hf_model.to(device), model.to(device)
    batch = make_inputs(name, model, size, size.train_batch, answer=size.answer)
    to = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return hf_model, model, image_id, Inputs(to(batch.hf), to(batch.ours), batch.labels.to(device))


def bench_model(
    name: str, size: Size, device: torch.device, *, iters: int, best_settings: bool = True, progress=None
) -> dict[str, Any]:
    """All rows for one model: the guard, training steps, generation (each library's defaults,
    then both at their fastest: :func:`generation_settings`), memory."""
    hf_model, model, image_id, batch = prepared_pair(name, size, device)
    hf_in, our_in, labels = batch.hf, batch.ours, batch.labels
    to = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    guard = check_parity(name, hf_model, model, batch, atol=1e-4)
    dtype = getattr(torch, size.dtype)
    rows = []

    def add(
        measure: str,
        unit: str,
        ours: float,
        theirs: float,
        higher_is_better: bool = True,
        rounds: dict[str, list[float]] | None = None,
    ) -> None:
        ratio = ours / theirs if higher_is_better else theirs / ours
        rows.append(dict(model=name, measure=measure, unit=unit, vlm=ours, transformers=theirs, ratio=ratio))
        if rounds is not None:  # seconds per round: vlm's speed over transformers' is their time over ours
            rows[-1]["ratio_spread"] = spread(rounds["transformers"], rounds["vlm"])
        if progress:
            progress(rows[-1])

    for which in ("connector", "full"):
        steps = {}
        for key, m, inputs in (("vlm", model, our_in), ("transformers", hf_model, hf_in)):
            params = set_trainable(name, m, which, ours=key == "vlm")
            ours = key == "vlm"
            steps[key] = train_step(m, inputs, labels, training_optimizer(params), ours=ours, dtype=dtype)
            # Before: the per-tensor AdamW loop (PyTorch's CPU default), which this benchmark used.
            loop = torch.optim.AdamW(params, lr=1e-5)
            steps[f"{key}, per-tensor AdamW"] = train_step(m, inputs, labels, loop, ours=ours, dtype=dtype)
        rounds = race_rounds(steps, device, warmup=2, iters=iters)
        seconds = {key: statistics.median(times) for key, times in rounds.items()}
        rows_per_s = size.train_batch / seconds["vlm"], size.train_batch / seconds["transformers"]
        add(f"train step, {which} trainable", "samples/s", *rows_per_s, rounds=rounds)
        rows[-1].update(utilisation(steps["vlm"], seconds["vlm"], device))
        before = {k: size.train_batch / seconds[f"{k}, per-tensor AdamW"] for k in ("vlm", "transformers")}
        rows[-1]["per_tensor_adamw"] = {
            **before,
            "ratio": before["vlm"] / before["transformers"],
            "ratio_spread": spread(rounds["transformers, per-tensor AdamW"], rounds["vlm, per-tensor AdamW"]),
        }
        steps = {k: steps[k] for k in ("vlm", "transformers")}
        if which == "full":
            peaks = {k: _peak_memory(s, device) for k, s in steps.items()}
            if peaks["vlm"] is not None:
                gib = 2**30
                add(
                    "peak memory, full training step",
                    "GiB",
                    peaks["vlm"] / gib,
                    peaks["transformers"] / gib,
                    False,
                )

    hf_model.eval(), model.eval()
    model.requires_grad_(False), hf_model.requires_grad_(False)
    if dtype != torch.float32:  # generation runs in the benchmark's precision, weights cast
        hf_model.to(dtype), model.to(dtype)
    n = size.gen_tokens
    for rows_n in (1, 16):
        prompt = make_inputs(name, model, size, rows_n, answer=0, seed=1)
        hf_p, our_p = to(prompt.hf), to(prompt.ours)
        if dtype != torch.float32:
            hf_p["pixel_values"], our_p["pixel_values"] = (
                hf_p["pixel_values"].to(dtype),
                our_p["pixel_values"].to(dtype),
            )
        for setting, (ours_kw, theirs_kw, warmup) in generation_settings(best_settings).items():
            steps = {
                "vlm": lambda our_p=our_p, kw=ours_kw: generate(model, **our_p, max_new_tokens=n, **kw),
                "transformers": lambda hf_p=hf_p, kw=theirs_kw: hf_model.generate(
                    **hf_p,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    suppress_tokens=[image_id],
                    **kw,
                ),
            }
            rounds = race_rounds(steps, device, warmup=warmup, iters=max(iters // 2, 2))
            seconds = {key: statistics.median(times) for key, times in rounds.items()}
            add(
                f"generate {n} tokens, batch {rows_n}{setting}",
                "tokens/s",
                rows_n * n / seconds["vlm"],
                rows_n * n / seconds["transformers"],
                rounds=rounds,
            )
    return {"guard": guard, "rows": rows}


def loss_row(size: Size, device: torch.device, *, iters: int) -> dict[str, Any]:
    """The training loss alone, forward and backward, over the logits of one training batch's
    answer tokens: vlm's cross-entropy against ``F.cross_entropy`` (which transformers' causal-LM
    loss calls)."""
    g = torch.Generator().manual_seed(0)
    rows = size.train_batch * size.answer
    logits = torch.randn(rows, size.vocab, generator=g).to(device)
    targets = torch.randint(0, size.vocab, (rows,), generator=g).to(device)

    def timed(loss_fn):
        def step():
            x = logits.detach().requires_grad_()
            loss_fn(x).backward()

        return step

    steps = {
        "vlm": timed(lambda x: cross_entropy(x, targets)),
        "transformers": timed(lambda x: F.cross_entropy(x, targets, ignore_index=IGNORE_INDEX)),
    }
    rounds = race_rounds(steps, device, warmup=2, iters=3 * iters)
    seconds = {key: statistics.median(times) for key, times in rounds.items()}
    return dict(
        model="loss",
        measure=f"cross-entropy, {rows} tokens x {size.vocab} vocabulary, forward + backward",
        unit="calls/s",
        vlm=1 / seconds["vlm"],
        transformers=1 / seconds["transformers"],
        ratio=seconds["transformers"] / seconds["vlm"],
        ratio_spread=spread(rounds["transformers"], rounds["vlm"]),
    )


def run(
    models=MODELS,
    size: str = "small",
    device: str = "auto",
    out: str | Path = "runs/bench",
    iters: int = 6,
    *,
    best_settings: bool = True,
    loader_images: int = 400,
):
    """Runs the benchmark and writes ``bench-<device>.json`` and ``.md`` under ``out``
    (``loader_images=0`` leaves the loader rows out)."""
    dev = pick_device(device)
    spec = SIZES[size]
    results = {
        "device": device_name(dev),
        "size": size,
        "shapes": dataclasses.asdict(spec),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torchvision": torchvision.__version__,
        "webdataset": version("webdataset"),
        "pillow": PIL.__version__,
        "rows": [],
        "guards": {},
    }
    bar = tqdm(models, desc="bench", unit="model")
    for name in bar:
        bar.set_postfix(model=name)
        result = bench_model(
            name,
            spec,
            dev,
            iters=iters,
            best_settings=best_settings,
            progress=lambda r: bar.write(format_row(r)),
        )
        results["rows"] += result["rows"]
        results["guards"][name] = result["guard"]
    results["rows"].append(loss_row(spec, dev, iters=iters))
    tqdm.write(format_row(results["rows"][-1]))
    if loader_images:
        with tempfile.TemporaryDirectory() as tmp:
            shards = bench_loader.write_shards(Path(tmp), loader_images)
            rows = bench_loader.loader_rows(shards, loader_images, iters=max(iters // 2, 2))
        for row in rows:
            tqdm.write(format_row(row))
        results["rows"] += rows
        large = SIZES["large"]
        results["feeding"] = bench_loader.feeding(bench_loader.stage1_flops(large), rows, pixels=large.image)
        tqdm.write(feeding_text(results["feeding"]))
    return results, write_report(results, out, "bench", markdown)


def feeding_text(feeding: dict[str, Any]) -> str:
    """One sentence: how many of this machine's loader workers keep the ``large`` stage-1 step fed."""
    rates = feeding["images_per_s_per_worker"]
    workers = ", ".join(
        f"{n} {variant} ({rates[variant]:.0f} images/s each)" for variant, n in feeding["workers"].items()
    )
    return (
        f"Loader workers for the `large` stage-1 step ({feeding['flops_per_sample'] / 1e12:.2f} TFLOP "
        f"per sample) at {feeding['mfu']:.0%} MFU on an {feeding['gpu']}: it takes "
        f"{feeding['samples_per_s']:.0f} images/s at {feeding['pixels']} px, so it needs, in workers "
        f"as fast as this machine's cores: {workers}."
    )


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['model']:8s} {row['measure']:36s} vlm {row['vlm']:10.2f}  transformers "
        f"{row['transformers']:10.2f} {row['unit']:10s} ratio {row['ratio']:.2f}"
    )


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# vlm vs transformers on {results['device']} (size `{results['size']}`)",
        "",
        f"torch {results['torch']}, transformers {results['transformers']}, torchvision "
        f"{results['torchvision']}, webdataset {results['webdataset']}, Pillow "
        f"{results['pillow']}. Ratio: vlm's speed over transformers' (loader rows: over a "
        "minimal webdataset + torchvision pipeline, in the transformers column; memory: "
        "transformers' peak over vlm's); above 1 means vlm is better.",
        "",
        "| model | measure | vlm | transformers | unit | ratio | round by round (min / median / max) |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for r in results["rows"]:
        cells = [r["model"], r["measure"], f"{r['vlm']:.2f}", f"{r['transformers']:.2f}", r["unit"]]
        low, mid, high = r.get("ratio_spread", (None, None, None))
        rounds = f"{low:.2f} / {mid:.2f} / {high:.2f}" if low is not None else "-"
        lines.append("| " + " | ".join(cells) + f" | {r['ratio']:.2f} | {rounds} |")
    before = [r for r in results["rows"] if "per_tensor_adamw" in r]
    if before:
        lines += [
            "",
            "Training steps with the per-tensor AdamW loop (PyTorch's CPU default, what this benchmark "
            "used before) and with the fused AdamW both trainers default to, in the same rounds "
            "(samples/s):",
            "",
            "| model | measure | vlm, loop | transformers, loop | ratio, loop | vlm, fused | ratio, fused "
            "| vlm fused / vlm loop |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in before:
            b = r["per_tensor_adamw"]
            lines.append(
                f"| {r['model']} | {r['measure']} | {b['vlm']:.2f} | {b['transformers']:.2f} | "
                f"{b['ratio']:.2f} | {r['vlm']:.2f} | {r['ratio']:.2f} | {r['vlm'] / b['vlm']:.2f} |"
            )
    flops = [r for r in results["rows"] if "vlm_tflops" in r]
    if flops:
        lines += ["", "vlm's training steps, FLOPs counted by `FlopCounterMode`:", ""]
        for r in flops:
            mfu = f", MFU {r['vlm_mfu']:.1%}" if "vlm_mfu" in r else ""
            lines.append(f"- {r['model']}, {r['measure']}: {r['vlm_tflops']:.3f} TFLOP/s{mfu}")
    if "feeding" in results:
        lines += ["", feeding_text(results["feeding"])]
    lines += [
        "",
        "Correctness guard (before timing, same weights): "
        + ", ".join(f"{k} max logit diff {v['max_logit_diff']:.1e}" for k, v in results["guards"].items()),
        "",
    ]
    return "\n".join(lines)
