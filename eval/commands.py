"""What ``vlm caption | vqa | eval | chat | serve | bench`` run (their parsers are in
``vlm.eval.cli``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import uvicorn
from tqdm import tqdm

from vlm.data.decode import DecodeStats
from vlm.eval import bench, bench_convert, bench_options, bench_profile, bench_serve
from vlm.eval.chat import chat_loop
from vlm.eval.evaluate import evaluate, evaluate_shots, score_file
from vlm.eval.predict import (
    InputError,
    Predictor,
    batched,
    check_model_dir,
    plan_inputs,
    read_sources,
    read_support,
)
from vlm.eval.serve import Limits, Service, create_app
from vlm.generate import GenerationConfig
from vlm.schema import ConfigError

log = logging.getLogger(__name__)


def finish(command: str, done: int, what: str, stats: DecodeStats) -> int:
    """Reports what was skipped and picks the exit code: 0 when every input was read, 1 when
    some were skipped, 2 (an ``InputError``) when nothing could be read."""
    skipped, reasons = sum(stats.skipped.values()), stats.skipped_counts()
    if not done:
        raise InputError(f"nothing could be read ({skipped} skipped: {reasons or 'no inputs'})")
    if skipped:
        print(f"vlm {command}: {done} {what}; {skipped} input(s) skipped: {reasons}", file=sys.stderr)
        return 1
    return 0


def predict_command(args: argparse.Namespace) -> int:
    check_model_dir(args.model)
    stats = DecodeStats()
    sources = plan_inputs(args.images, stats)  # before the model loads: nothing there fails fast
    if not sources:
        return finish(args.command, 0, "answered", stats)
    shots = _support(args.support, args.shots)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    predictor = Predictor(args.model, device=args.device, generation=generation)
    question = getattr(args, "question", None)
    done = 0
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
    try:
        with tqdm(desc=args.command, unit="image", disable=args.out is None) as bar:
            for chunk in batched(read_sources(sources, stats), args.batch_size):
                questions = [question] * len(chunk) if question else None
                texts = predictor.predict(
                    [i.image for i in chunk], args.command, questions, support=[shots] * len(chunk)
                )
                for item, text in zip(chunk, texts):
                    record = {
                        "image": item.name,
                        **({"question": question} if question else {}),
                        "prediction": text,
                    }
                    out.write(json.dumps(record) + "\n")
                out.flush()  # a crash or Ctrl-C keeps every answer made so far
                done += len(chunk)
                bar.update(len(chunk))
    finally:
        if out is not sys.stdout:
            out.close()
    return finish(args.command, done, "answered", stats)


def eval_command(args: argparse.Namespace) -> int:
    if args.predictions:
        metrics = score_file(args.predictions, args.task, args.out)
        code = 0
    elif args.model and args.data and args.shots is not None:
        check_model_dir(args.model)
        metrics = evaluate_shots(
            args.model,
            args.data,
            args.task,
            args.out,
            shots=args.shots,
            support=args.support,
            limit=args.limit,
            device=args.device,
            seed=args.seed,
        )
        key = "vqa_accuracy" if args.task == "vqa" else "cider"
        for k, shot_metrics in metrics["shots"].items():
            print(f"{k}-shot {key}: {shot_metrics[key]:.4f}")
        print(f"wrote {args.out}/metrics.json")
        return 0
    elif args.model and args.data:
        check_model_dir(args.model)
        run = evaluate(args.model, args.data, args.task, args.out, limit=args.limit, device=args.device)
        metrics = run.metrics
        code = finish(args.command, len(run.records), "examples evaluated", run.inputs)
    else:
        raise ValueError("give --predictions FILE, or --model DIR and --data SHARDS")
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
    print(f"wrote {args.out}/metrics.json")
    return code


def chat_command(args: argparse.Namespace) -> int:
    check_model_dir(args.model)
    predictor = Predictor(
        args.model, device=args.device, generation=GenerationConfig(max_new_tokens=args.max_new_tokens)
    )
    return chat_loop(predictor, args.images)


def serve_command(args: argparse.Namespace) -> int:
    check_model_dir(args.model)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who reaches this address can use the model", args.host)
    predictor = Predictor(args.model, device=args.device)
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_images=args.max_images,
        default_max_tokens=args.max_tokens,
        local_images=Path(args.local_images) if args.local_images else None,
        remote_images=args.allow_remote_images,
        remote_timeout_s=args.remote_image_timeout,
        private_image_hosts=args.allow_private_image_hosts,
        max_waiting=args.max_waiting,
        request_timeout_s=args.request_timeout or None,
    )
    name = args.served_model_name or Path(args.model).resolve().name
    service = Service(predictor, model_name=name, limits=limits, max_batch_size=args.max_batch_size)
    print(f"serving {name} on http://{args.host}:{args.port} (the page at /, the API at /v1)", flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    """vlm against transformers' LLaVA / BLIP-2 / IDEFICS on the same weights (eval/bench.py)."""
    models = _bench_models(args.models or list(bench.MODELS), "--models")
    if args.profile:
        _bench_models([args.profile], "--profile")
        path = bench_profile.run(args.profile, size=args.size, device=args.device, out=args.out)
        print(path.read_text())
        print(f"wrote {path}")
        return 0
    if args.options:
        path = bench_options.run(out=args.out, device=args.device)
        print(path.with_suffix(".md").read_text())
        print(f"wrote {path} and {path.with_suffix('.md')}")
        return 0
    if args.serve:
        _, path = bench_serve.run(out=args.out, seconds=args.seconds)
        print(path.with_suffix(".md").read_text())
        print(f"wrote {path} and {path.with_suffix('.md')}")
        return 0
    if args.convert:
        path = bench_convert.run(out=args.out)
        print(path.read_text())
        print(f"wrote {path}")
        return 0
    _, path = bench.run(
        models,
        size=args.size,
        device=args.device,
        out=args.out,
        iters=args.iters,
        best_settings=not args.defaults_only,
        loader_images=args.loader_images,
    )
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def _support(path: str | None, shots: int | None) -> list:
    """The support examples of ``--support`` (the first ``--shots`` of them), read before the
    model loads: asking for more than the file holds is an error, not a quiet cap."""
    if path is None:
        if shots:
            raise InputError(f"--shots {shots} takes its examples from --support FILE: give one")
        return []
    examples = read_support(path)
    if shots is not None and shots > len(examples):
        raise InputError(
            f"--shots {shots}: the support file {path} holds {len(examples)} example(s); "
            f"ask for {len(examples)} or fewer, or add examples to it"
        )
    return examples[:shots]


def _bench_models(names: list[str], flag: str) -> list[str]:
    unknown = [name for name in names if name not in bench.MODELS]
    if unknown:
        raise ConfigError(
            f"{flag}: unknown model(s) {', '.join(map(repr, unknown))}; "
            f"the benchmark's models are the checkpoint formats: {', '.join(bench.MODELS)}"
        )
    return names
