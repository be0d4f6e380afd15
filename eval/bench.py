"""``vlm bench``: vlm against transformers' own LLaVA, BLIP-2 and IDEFICS, same weights, one process.

Each model is built once by transformers with random weights, saved, and loaded by vlm through
its converter (:mod:`vlm.convert`), so both sides compute with identical weights. Before any
timing, both must give the same logits and the same loss (the correctness guard). Then, with
measurements interleaved so that drift hits both sides alike:

- a training step (forward, backward, AdamW) with only the connector trainable, then with
  everything trainable;
- greedy generation of ``gen_tokens`` new tokens at batch 1 and batch 16;
- on CUDA, the peak memory of a full training step.

Every row's ``ratio`` is vlm's speed over transformers' (above 1: vlm is faster); for memory,
transformers' peak over vlm's.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vlm
from vlm.generate import generate

MODELS = ("llava", "blip2", "idefics")
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Size:
    """The shapes of one benchmark: a CLIP-like tower, a Llama / OPT decoder, the batch."""

    image: int
    patch: int
    vision_width: int
    vision_depth: int
    vision_heads: int
    text_width: int
    text_depth: int
    text_heads: int
    text_kv_heads: int
    text_ffn: int
    vocab: int
    queries: int  # BLIP-2 queries / IDEFICS latents
    connector_depth: int  # Q-Former / resampler layers
    train_batch: int
    prompt: int  # text tokens before the answer
    answer: int  # labelled tokens
    gen_tokens: int
    dtype: str = "float32"
    init_range: float = 0.02


SIZES = {
    # A few seconds: the tests' size.
    "tiny": Size(32, 8, 32, 2, 2, 64, 2, 4, 2, 128, 512, 4, 2, 2, 6, 6, 8, init_range=0.2),
    # The CPU default: a few minutes for all three models.
    "small": Size(112, 14, 192, 4, 4, 256, 4, 4, 2, 704, 32000, 16, 2, 4, 24, 24, 64),
    # A GPU: CLIP ViT-L/14-336 shapes and a ~1B-parameter Llama-shaped decoder in bf16.
    "large": Size(336, 14, 1024, 24, 16, 2048, 16, 32, 8, 8192, 32000, 64, 6, 16, 32, 96, 64, "bfloat16"),
}


# --- the transformers models -------------------------------------------------------------------


def _vision(size: Size, **extra: Any) -> dict[str, Any]:
    return dict(
        hidden_size=size.vision_width,
        intermediate_size=4 * size.vision_width,
        num_hidden_layers=size.vision_depth,
        num_attention_heads=size.vision_heads,
        image_size=size.image,
        patch_size=size.patch,
        **extra,
    )


def _llama(size: Size) -> dict[str, Any]:
    return dict(
        hidden_size=size.text_width,
        intermediate_size=size.text_ffn,
        num_hidden_layers=size.text_depth,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        vocab_size=size.vocab,
        initializer_range=size.init_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_transformers(name: str, size: Size, image_token_id: int) -> nn.Module:
    """transformers' own model ``name`` at ``size``, randomly initialised."""
    import transformers as tf

    if name == "llava":
        config = tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(**_vision(size, initializer_factor=size.init_range / 0.02)),
            text_config=tf.LlamaConfig(**_llama(size)),
            image_token_id=image_token_id,
            initializer_range=size.init_range,
        )
        return tf.LlavaForConditionalGeneration(config)
    if name == "blip2":
        opt = tf.OPTConfig(
            hidden_size=size.text_width,
            ffn_dim=size.text_ffn,
            num_hidden_layers=size.text_depth,
            num_attention_heads=size.text_heads,
            vocab_size=size.vocab,
            word_embed_proj_dim=size.text_width,
            init_std=size.init_range,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        config = tf.Blip2Config(
            vision_config=_vision(size, initializer_range=size.init_range),
            qformer_config=dict(
                hidden_size=size.vision_width,
                intermediate_size=4 * size.vision_width,
                num_hidden_layers=size.connector_depth,
                num_attention_heads=size.vision_heads,
                encoder_hidden_size=size.vision_width,
                initializer_range=size.init_range,
            ),
            text_config=opt.to_dict(),
            num_query_tokens=size.queries,
            image_token_index=image_token_id,
            initializer_range=size.init_range,
        )
        model = tf.Blip2ForConditionalGeneration(config)
        with torch.no_grad():  # transformers starts the queries at zero: make them distinct
            model.query_tokens.normal_(0, 1)
        return model
    if name == "idefics":
        vision = _vision(size)
        vision["embed_dim"] = vision.pop("hidden_size")
        llama = _llama(size)
        config = tf.IdeficsConfig(
            **{k: v for k, v in llama.items() if k != "num_key_value_heads"},
            cross_layer_interval=max(size.text_depth // 4, 1),
            use_resampler=True,
            alpha_initializer="ones",  # open gates: the images reach the text
            vision_config=vision,
            perceiver_config=dict(
                resampler_n_latents=size.queries,
                resampler_depth=size.connector_depth,
                resampler_n_heads=size.vision_heads,
                resampler_head_dim=size.vision_width // size.vision_heads,
            ),
        )
        return tf.IdeficsForVisionText2Text(config)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def placeholder_tokenizer(vocab: int):
    """A word-level tokenizer of ``vocab`` tokens with ``<image>`` at id 4 (IDEFICS checkpoints
    carry their tokenizer, which names the image token)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN] + [f"w{i}" for i in range(vocab - 5)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN],
    )


def model_pair(name: str, size: Size, directory: Path) -> tuple[nn.Module, vlm.VisionLanguageModel, int]:
    """transformers' model and vlm's conversion of its saved checkpoint, in float32 on the CPU."""
    image_token_id = 4
    hf_model = build_transformers(name, size, image_token_id)
    hf_model.save_pretrained(directory)
    placeholder_tokenizer(size.vocab).save_pretrained(directory)
    return hf_model, vlm.from_pretrained(directory), image_token_id


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
    """``rows`` prompts of one image each (no padding), then ``answer`` labelled tokens."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((rows, model.tokens_per_image), model.image_token_id)
    text = torch.randint(5, size.vocab, (rows, size.prompt + answer), generator=g)
    ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
    pixels = torch.randn(rows, 3, size.image, size.image, generator=g)
    mask = torch.ones_like(ids)
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < ids.shape[1] - answer, -100)
    ours = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    hf = dict(ours)
    if name == "idefics":  # one image per row, seen from its <image> token on
        hf["pixel_values"] = pixels[:, None]
        hf["image_attention_mask"] = (ids == model.image_token_id).long().cumsum(1)[..., None]
    return Inputs(hf, ours, labels)


# --- measurements ------------------------------------------------------------------------------


def set_trainable(name: str, model: nn.Module, which: str, *, ours: bool) -> list[nn.Parameter]:
    """Makes the connector (``which="connector"``) or everything (``"full"``) trainable."""
    model.requires_grad_(which == "full")
    if which == "connector":
        if ours:
            connector = [model.bridge]
        else:
            owner = getattr(model, "model", model)
            parts = {
                "llava": ["multi_modal_projector"],
                "blip2": ["qformer", "language_projection"],
                "idefics": ["perceiver_resampler", "gated_cross_attn_layers"],
            }[name]
            connector = [getattr(owner, p) if hasattr(owner, p) else getattr(model, p) for p in parts]
            if name == "blip2":
                model.query_tokens.requires_grad_(True)
        for module in connector:
            module.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def race(
    steps: dict[str, Callable[[], Any]], device: torch.device, *, warmup: int, iters: int
) -> dict[str, float]:
    """Median seconds of each callable, run interleaved (a, b, a, b, ...) after ``warmup`` rounds."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(warmup + iters):
        for key, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _train_step(
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


#: Dense bf16 tensor-core peaks (FLOP/s) of the GPUs this project may be lent, for MFU.
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step``, counted by PyTorch's ``FlopCounterMode`` (matmuls and
    attention, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


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


def bench_model(name: str, size: Size, device: torch.device, *, iters: int, progress=None) -> dict[str, Any]:
    """All rows for one model: the guard, training steps, generation, memory."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model, model, image_id = model_pair(name, size, Path(tmp))
    hf_model.to(device), model.to(device)
    batch = make_inputs(name, model, size, size.train_batch, answer=size.answer)
    to = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    hf_in, our_in, labels = to(batch.hf), to(batch.ours), batch.labels.to(device)
    guard = check_parity(name, hf_model, model, Inputs(hf_in, our_in, labels), atol=1e-4)
    dtype = getattr(torch, size.dtype)
    rows = []

    def add(measure: str, unit: str, ours: float, theirs: float, higher_is_better: bool = True) -> None:
        ratio = ours / theirs if higher_is_better else theirs / ours
        rows.append(dict(model=name, measure=measure, unit=unit, vlm=ours, transformers=theirs, ratio=ratio))
        if progress:
            progress(rows[-1])

    for which in ("connector", "full"):
        steps = {}
        for key, m, inputs in (("vlm", model, our_in), ("transformers", hf_model, hf_in)):
            params = set_trainable(name, m, which, ours=key == "vlm")
            optimizer = torch.optim.AdamW(params, lr=1e-5)
            steps[key] = _train_step(m, inputs, labels, optimizer, ours=key == "vlm", dtype=dtype)
        seconds = race(steps, device, warmup=2, iters=iters)
        rows_per_s = size.train_batch / seconds["vlm"], size.train_batch / seconds["transformers"]
        add(f"train step, {which} trainable", "samples/s", *rows_per_s)
        rows[-1].update(utilisation(steps["vlm"], seconds["vlm"], device))
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
        steps = {
            "vlm": lambda our_p=our_p: generate(model, **our_p, max_new_tokens=n),
            "transformers": lambda hf_p=hf_p: hf_model.generate(
                **hf_p, max_new_tokens=n, min_new_tokens=n, do_sample=False, suppress_tokens=[image_id]
            ),
        }
        seconds = race(steps, device, warmup=1, iters=max(iters // 2, 2))
        add(
            f"generate {n} tokens, batch {rows_n}",
            "tokens/s",
            rows_n * n / seconds["vlm"],
            rows_n * n / seconds["transformers"],
        )
    return {"guard": guard, "rows": rows}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def run(
    models=MODELS, size: str = "small", device: str = "auto", out: str | Path = "eval/results", iters: int = 6
):
    """Runs the benchmark and writes ``bench-<device>.json`` and ``.md`` under ``out``."""
    from tqdm import tqdm

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    spec = SIZES[size]
    results = {
        "device": device_name(dev),
        "size": size,
        "shapes": dataclasses.asdict(spec),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "rows": [],
        "guards": {},
    }
    bar = tqdm(models, desc="bench", unit="model")
    for name in bar:
        bar.set_postfix(model=name)
        result = bench_model(name, spec, dev, iters=iters, progress=lambda r: bar.write(format_row(r)))
        results["rows"] += result["rows"]
        results["guards"][name] = result["guard"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench-" + results["device"].replace(" ", "-").lower()
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(results))
    return results, out / f"{stem}.json"


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['model']:8s} {row['measure']:36s} vlm {row['vlm']:10.2f}  transformers "
        f"{row['transformers']:10.2f} {row['unit']:10s} ratio {row['ratio']:.2f}"
    )


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# vlm vs transformers on {results['device']} (size `{results['size']}`)",
        "",
        f"torch {results['torch']}, transformers {results['transformers']}. Ratio: vlm's speed over "
        "transformers' (memory: transformers' peak over vlm's); above 1 means vlm is better.",
        "",
        "| model | measure | vlm | transformers | unit | ratio |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in results["rows"]:
        cells = [r["model"], r["measure"], f"{r['vlm']:.2f}", f"{r['transformers']:.2f}", r["unit"]]
        lines.append("| " + " | ".join(cells) + f" | {r['ratio']:.2f} |")
    flops = [r for r in results["rows"] if "vlm_tflops" in r]
    if flops:
        lines += ["", "vlm's training steps, FLOPs counted by `FlopCounterMode`:", ""]
        for r in flops:
            mfu = f", MFU {r['vlm_mfu']:.1%}" if "vlm_mfu" in r else ""
            lines.append(f"- {r['model']}, {r['measure']}: {r['vlm_tflops']:.3f} TFLOP/s{mfu}")
    lines += [
        "",
        "Correctness guard (before timing, same weights): "
        + ", ".join(f"{k} max logit diff {v['max_logit_diff']:.1e}" for k, v in results["guards"].items()),
        "",
    ]
    return "\n".join(lines)
