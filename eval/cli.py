"""``vlm caption | vqa | eval | chat | serve | bench``."""

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
from vlm.subcommand import add_subcommand

log = logging.getLogger(__name__)


def add_commands(commands: argparse._SubParsersAction) -> None:
    for task, help_text in (("caption", "caption images"), ("vqa", "answer a question about images")):
        sub = add_subcommand(
            commands, task, help=f"{help_text} (files, folders or shards) with a trained model"
        )
        sub.add_argument("images", nargs="+", help="image files, folders of images, or webdataset shards")
        sub.add_argument(
            "--model", required=True, help="a model directory (from `vlm train` or save_pretrained)"
        )
        if task == "vqa":
            sub.add_argument("--question", required=True, help="the question to ask about every image")
        sub.add_argument(
            "--support",
            help="few-shot: JSONL of {image, answer"
            + (", question" if task == "vqa" else "")
            + "} examples placed before every query (images relative to the file)",
        )
        sub.add_argument(
            "--shots", type=int, default=None, help="use the first K support examples (default: all)"
        )
        sub.add_argument("--out", default=None, help="JSONL file to write (default: print to stdout)")
        sub.add_argument("--batch-size", type=int, default=16)
        sub.add_argument("--max-new-tokens", type=int, default=32)
        sub.add_argument("--num-beams", type=int, default=1)
        sub.add_argument("--device", default="auto")
        sub.set_defaults(func=_predict)

    ev = add_subcommand(commands, "eval", help="evaluate a model on shards, or score a predictions file")
    ev.add_argument("--task", required=True, choices=["caption", "vqa"])
    ev.add_argument("--out", required=True, help="directory for metrics.json (and gallery.html)")
    ev.add_argument("--model", help="a model directory")
    ev.add_argument("--data", help="shards to evaluate on")
    ev.add_argument("--predictions", help="JSONL of {prediction, references | answers} from any model")
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most this many examples")
    ev.add_argument(
        "--shots",
        type=_int_list,
        default=None,
        help="few-shot: numbers of support examples, e.g. 0,1,2,4 (a report for each)",
    )
    ev.add_argument("--support", help="shards the support examples are drawn from (another split)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the support draws")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=_eval)

    chat = add_subcommand(commands, "chat", help="talk with a trained model about images, in the terminal")
    chat.add_argument("images", nargs="*", help="images that go with your first message")
    chat.add_argument(
        "--model", required=True, help="a model directory (from `vlm train` or save_pretrained)"
    )
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--device", default="auto")
    chat.set_defaults(func=_chat)

    serve = add_subcommand(
        commands, "serve", help="serve a model over OpenAI's chat-completions API, with a page at /"
    )
    serve.add_argument(
        "--model", required=True, help="a model directory (from `vlm train` or save_pretrained)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--served-model-name", help="the model id clients ask for (default: the directory's name)"
    )
    serve.add_argument(
        "--max-batch-size", type=int, default=16, help="requests generating at once (1: one at a time)"
    )
    serve.add_argument("--max-tokens", type=int, default=128, help="a completion's budget when none is asked")
    serve.add_argument("--max-images", type=int, default=8, help="images per request, at most")
    serve.add_argument("--max-body-mb", type=float, default=20.0, help="request bodies over this are refused")
    serve.add_argument(
        "--local-images", metavar="DIR", help="allow file:// URLs and paths to images inside DIR"
    )
    serve.add_argument("--allow-remote-images", action="store_true", help="fetch http(s):// image URLs")
    serve.add_argument("--device", default="auto")
    serve.set_defaults(func=_serve)

    parser = add_subcommand(
        commands, "bench", help="time vlm against transformers' LLaVA, BLIP-2 and IDEFICS"
    )
    parser.add_argument("--models", nargs="+", default=list(bench.MODELS), choices=list(bench.MODELS))
    parser.add_argument("--size", default="small", choices=list(bench.SIZES), help="small: CPU; large: GPU")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--iters", type=int, default=6, help="timed rounds per measurement")
    parser.add_argument("--out", default="eval/results", help="where bench-<device>.json/.md go")
    parser.add_argument(
        "--defaults-only",
        action="store_true",
        help="leave out the generation rows at both libraries' fastest settings (they compile)",
    )
    parser.add_argument(
        "--loader-images",
        type=int,
        default=400,
        help="images in the loader rows' shards (0 leaves the loader rows out)",
    )
    parser.add_argument(
        "--profile",
        choices=list(bench.MODELS),
        help="instead: torch.profiler's top operators of this model's training steps (profile-<model>-*.md)",
    )
    parser.add_argument(
        "--options",
        action="store_true",
        help="instead: what packing, the feature cache and the KV cache buy (options-<device>.*)",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="instead: vlm serve with 1, 4 and 16 clients, batched and not (serve-<device>.*)",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="--serve: seconds of load per run")
    parser.add_argument(
        "--convert",
        action="store_true",
        help="instead: peak memory of converting a bf16 LLaVA checkpoint (convert-<device>.json)",
    )
    parser.set_defaults(func=_bench)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected numbers like 0,1,2,4, got {text!r}") from err


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


def _predict(args: argparse.Namespace) -> int:
    check_model_dir(args.model)
    stats = DecodeStats()
    sources = plan_inputs(args.images, stats)  # before the model loads: nothing there fails fast
    if not sources:
        return finish(args.command, 0, "answered", stats)
    shots = read_support(args.support)[: args.shots] if args.support else []
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


def _eval(args: argparse.Namespace) -> int:
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


def _chat(args: argparse.Namespace) -> int:
    check_model_dir(args.model)
    predictor = Predictor(
        args.model, device=args.device, generation=GenerationConfig(max_new_tokens=args.max_new_tokens)
    )
    return chat_loop(predictor, args.images)


def _serve(args: argparse.Namespace) -> int:
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
    )
    name = args.served_model_name or Path(args.model).resolve().name
    service = Service(predictor, model_name=name, limits=limits, max_batch_size=args.max_batch_size)
    print(f"serving {name} on http://{args.host}:{args.port} (the page at /, the API at /v1)", flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """vlm against transformers' LLaVA / BLIP-2 / IDEFICS on the same weights (eval/bench.py)."""
    if args.profile:
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
        args.models,
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
