"""The ``vlm`` command line.

The CLI is the one place in ``vlm/`` that reaches into ``train/``, ``data/`` and ``eval/``,
and only inside the subcommand that needs them, so ``import vlm`` stays light.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vlm.schema import ConfigError


def _recipes() -> Path:
    from importlib.resources import files

    return Path(str(files("vlm.train") / "recipes"))  # the shipped recipes, installed or not


def _demo(args: argparse.Namespace) -> int:
    """Shapes data -> the shapes recipe -> evaluation on the held-out test split."""
    import time

    from vlm.data.shapes import combination
    from vlm.eval.evaluate import evaluate
    from vlm.eval.gallery import write_gallery
    from vlm.eval.predict import Predictor
    from vlm.train.recipe import load_recipe
    from vlm.train.trainer import train

    out = Path(args.out)
    recipe = load_recipe(args.recipe, [f"run.out={json.dumps(str(out / 'train'))}", *args.set])
    print(f"vlm demo: shapes data in {recipe.data.shapes}, recipe {args.recipe}, run in {out}")
    summary = train(recipe)

    test = str(Path(recipe.data.shapes) / "test")
    predictor = Predictor(summary["model"])
    start = time.perf_counter()
    vqa_run = evaluate(
        summary["model"], test, "vqa", out / "eval-vqa", group=combination, predictor=predictor
    )
    caption_run = evaluate(
        summary["model"], test, "caption", out / "eval-caption", group=combination, predictor=predictor
    )
    vqa, caption = vqa_run.metrics, caption_run.metrics
    metrics = {
        "vqa_accuracy": vqa["vqa_accuracy"],
        **{
            k: caption[k]
            for k in ("cider", "bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "meteor")
            if k in caption
        },
        "train_seconds": round(summary["train_seconds"], 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "train_steps": summary["steps"],
        "groups": {
            name: {
                "vqa_accuracy": vqa["groups"][name]["vqa_accuracy"],
                "cider": caption["groups"][name]["cider"],
            }
            for name in vqa.get("groups", {})
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shown = caption_run.gallery[:24] + vqa_run.gallery[:36]
    write_gallery(
        out / "gallery.html",
        "vlm demo: shapes test split",
        shown,
        {k: v for k, v in metrics.items() if isinstance(v, float)},
    )
    print("\n  metric (test split)      all     " + "  ".join(f"{g:>22}" for g in metrics["groups"]))
    for key in ("vqa_accuracy", "cider"):
        groups = "  ".join(f"{metrics['groups'][g][key]:>22.3f}" for g in metrics["groups"])
        print(f"  {key:<22} {metrics[key]:>6.3f}   {groups}")
    for key in ("bleu4", "rouge_l", "train_seconds"):
        print(
            f"  {key:<22} {metrics[key]:>6.3f}"
            if isinstance(metrics[key], float)
            else f"  {key:<22} {metrics[key]}"
        )
    print("\n  a few predictions:")
    for item in shown[:3] + shown[-4:]:
        question = f"Q: {item['question']}  " if item.get("question") else ""
        expected = (item.get("answers") or item.get("references"))[0]
        print(f"    {question}-> {item['prediction']!r}   (expected {expected!r})")
    print(f"\nwrote {out / 'metrics.json'} and {out / 'gallery.html'}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from vlm.data import commands

    if args.data_command == "check":
        report = commands.check(args.shards, as_json=args.json, max_pixels=args.max_pixels)
        skipped = sum(report["skipped"].values())
        return 2 if not report["ok"] else 1 if skipped else 0
    if args.data_command == "write":
        commands.write(
            out=args.out,
            images=args.images,
            captions=args.captions,
            coco=args.coco,
            vqa=args.vqa,
            prefix=args.prefix,
            samples_per_shard=args.samples_per_shard,
            num_shards=args.num_shards,
        )
        return 0
    from vlm.data.shapes import write_shapes

    manifest = write_shapes(
        args.out, seed=args.seed, train=args.train, val=args.val, test=args.test, image_size=args.image_size
    )
    print(json.dumps({k: manifest[k] for k in ("counts", "held_out") if k in manifest}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from vlm.train.recipe import load_recipe
    from vlm.train.trainer import TrainingError, train

    overrides = list(args.set)
    if args.max_steps is not None:
        overrides.append(f"run.max_steps={args.max_steps}")
    if args.out is not None:
        overrides.append(f"run.out={json.dumps(args.out)}")
    if args.cache_features:
        overrides.append("run.cache_features=true")
    recipe = load_recipe(args.recipe, overrides)
    try:
        summary = train(recipe, resume=args.resume)
    except TrainingError as err:
        print(f"vlm train: {err}", file=sys.stderr)
        return 1
    if "model" in summary:
        print(
            f"trained {summary['steps']} steps in {summary['train_seconds']:.0f} s, final loss "
            f"{summary['final_loss']:.4f}; model in {summary['model']}, logs in {summary['run_dir']}"
        )
    return 0


def _finish(command: str, done: int, what: str, stats) -> int:
    """Reports what was skipped and picks the exit code: 0 when every input was read, 1 when
    some were skipped, 2 when nothing could be read."""
    from vlm.eval.predict import InputError

    skipped, reasons = sum(stats.skipped.values()), stats.skipped_counts()
    if not done:
        raise InputError(f"nothing could be read ({skipped} skipped: {reasons or 'no inputs'})")
    if skipped:
        print(f"vlm {command}: {done} {what}; {skipped} input(s) skipped: {reasons}", file=sys.stderr)
        return 1
    return 0


def _predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vlm.data.decode import DecodeStats
    from vlm.eval.predict import Predictor, batched, check_model_dir, plan_inputs, read_sources
    from vlm.generate import GenerationConfig

    check_model_dir(args.model)
    stats = DecodeStats()
    sources = plan_inputs(args.images, stats)  # before the model loads: nothing there fails fast
    if not sources:
        return _finish(args.command, 0, "answered", stats)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    predictor = Predictor(args.model, device=args.device, generation=generation)
    question = getattr(args, "question", None)
    done = 0
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
    try:
        with tqdm(desc=args.command, unit="image", disable=args.out is None) as bar:
            for chunk in batched(read_sources(sources, stats), args.batch_size):
                questions = [question] * len(chunk) if question else None
                texts = predictor.predict([i.image for i in chunk], args.command, questions)
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
    return _finish(args.command, done, "answered", stats)


def _eval(args: argparse.Namespace) -> int:
    from vlm.eval.evaluate import evaluate, score_file

    if args.predictions:
        metrics = score_file(args.predictions, args.task, args.out)
        code = 0
    elif args.model and args.data:
        from vlm.eval.predict import check_model_dir

        check_model_dir(args.model)
        run = evaluate(args.model, args.data, args.task, args.out, limit=args.limit, device=args.device)
        metrics = run.metrics
        code = _finish(args.command, len(run.records), "examples evaluated", run.inputs)
    else:
        raise ValueError("give --predictions FILE, or --model DIR and --data SHARDS")
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
    print(f"wrote {args.out}/metrics.json")
    return code


def _save(args: argparse.Namespace) -> int:
    """Loads a model (a vlm directory, or a transformers LLaVA / BLIP-2 / IDEFICS one, converted)
    and writes it in vlm's format, with the tokenizer when the source has one."""
    from vlm.hub import from_pretrained
    from vlm.weights import load_tokenizer, save_pretrained

    source = Path(args.model)
    model = from_pretrained(source, dtype=args.dtype)
    tokenizer = load_tokenizer(source) if (source / "tokenizer_config.json").is_file() else None
    save_pretrained(model, args.out, tokenizer=tokenizer)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """vlm against transformers' LLaVA / BLIP-2 / IDEFICS on the same weights (eval/bench.py)."""
    if args.options:
        from vlm.eval.bench_options import run as run_options

        path = run_options(out=args.out)
        print(path.with_suffix(".md").read_text())
        print(f"wrote {path} and {path.with_suffix('.md')}")
        return 0
    if args.convert:
        from vlm.eval.bench_convert import run as run_convert

        path = run_convert(out=args.out)
        print(path.read_text())
        print(f"wrote {path}")
        return 0
    from vlm.eval.bench import run

    _, path = run(args.models, size=args.size, device=args.device, out=args.out, iters=args.iters)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def _command(commands, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser, with the options every command takes."""
    parser = commands.add_parser(name, **kwargs)
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (or set VLM_DEBUG=1)"
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm", description="Vision-language models: train, caption, ask.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = _command(commands, "demo", help="make the shapes data, train the default model, evaluate it")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--recipe", default=str(_recipes() / "shapes.toml"), help="default: shapes.toml")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    demo.set_defaults(func=_demo)

    for task, help_text in (("caption", "caption images"), ("vqa", "answer a question about images")):
        sub = _command(commands, task, help=f"{help_text} (files, folders or shards) with a trained model")
        sub.add_argument("images", nargs="+", help="image files, folders of images, or webdataset shards")
        sub.add_argument(
            "--model", required=True, help="a model directory (from `vlm train` or save_pretrained)"
        )
        if task == "vqa":
            sub.add_argument("--question", required=True, help="the question to ask about every image")
        sub.add_argument("--out", default=None, help="JSONL file to write (default: print to stdout)")
        sub.add_argument("--batch-size", type=int, default=16)
        sub.add_argument("--max-new-tokens", type=int, default=32)
        sub.add_argument("--num-beams", type=int, default=1)
        sub.add_argument("--device", default="auto")
        sub.set_defaults(func=_predict)

    ev = _command(commands, "eval", help="evaluate a model on shards, or score a predictions file")
    ev.add_argument("--task", required=True, choices=["caption", "vqa"])
    ev.add_argument("--out", required=True, help="directory for metrics.json (and gallery.html)")
    ev.add_argument("--model", help="a model directory")
    ev.add_argument("--data", help="shards to evaluate on")
    ev.add_argument("--predictions", help="JSONL of {prediction, references | answers} from any model")
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most this many examples")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=_eval)

    bench = _command(commands, "bench", help="time vlm against transformers' LLaVA, BLIP-2 and IDEFICS")
    bench.add_argument(
        "--models", nargs="+", default=["llava", "blip2", "idefics"], choices=["llava", "blip2", "idefics"]
    )
    bench.add_argument(
        "--size", default="small", choices=["tiny", "small", "large"], help="small: CPU; large: GPU"
    )
    bench.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    bench.add_argument("--iters", type=int, default=6, help="timed rounds per measurement")
    bench.add_argument("--out", default="eval/results", help="where bench-<device>.json/.md go")
    bench.add_argument(
        "--options",
        action="store_true",
        help="instead: what packing, the feature cache and the KV cache buy (options-<device>.*)",
    )
    bench.add_argument(
        "--convert",
        action="store_true",
        help="instead: peak memory of converting a bf16 LLaVA checkpoint (convert-<device>.json)",
    )
    bench.set_defaults(func=_bench)

    save = _command(
        commands, "save", help="write a model (vlm, or transformers LLaVA / BLIP-2 / IDEFICS) in vlm's format"
    )
    save.add_argument("--model", required=True, help="a model directory")
    save.add_argument("--out", required=True, help="where to write the vlm model")
    save.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="cast the weights (default: keep the checkpoint's dtype)",
    )
    save.set_defaults(func=_save)

    train = _command(commands, "train", help="train a model from a recipe (train/recipes/*.toml)")
    train.add_argument("recipe", help="recipe TOML file")
    train.add_argument("--max-steps", type=int, default=None, help="override run.max_steps")
    train.add_argument("--out", default=None, help="override run.out, the run directory")
    train.add_argument(
        "--resume", action="store_true", help="continue from the run directory's last checkpoint"
    )
    train.add_argument(
        "--cache-features", action="store_true", help="train from cached frozen-encoder features"
    )
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any recipe key (repeatable)"
    )
    train.set_defaults(func=_train)

    data = commands.add_parser("data", help="check, write and generate webdataset shards")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = _command(data_commands, "check", help="read shards as training would and report what it gets")
    check.add_argument("shards", nargs="+", help="shard files, directories, globs or brace patterns")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument("--max-pixels", type=int, default=None, help="decompression-bomb limit")

    write = _command(data_commands, "write", help="write shards from images and their texts")
    write.add_argument("--out", required=True, help="output directory")
    write.add_argument("--images", required=True, help="image folder the texts refer to")
    source = write.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", help="JSONL / CSV / JSON list of {image, caption(s)}")
    source.add_argument("--coco", help="COCO captions annotation JSON")
    source.add_argument("--vqa", help="JSON / JSONL of {image, question, answers}")
    write.add_argument("--prefix", default="shard")
    write.add_argument("--samples-per-shard", type=int, default=1000)
    write.add_argument("--num-shards", type=int, default=None, help="spread samples over this many shards")

    shapes = _command(data_commands, "shapes", help="generate the synthetic shapes dataset")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--train", type=int, default=20000)
    shapes.add_argument("--val", type=int, default=500)
    shapes.add_argument("--test", type=int, default=500)
    shapes.add_argument("--image-size", type=int, default=64)
    data.set_defaults(func=_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command. Exit codes: 0 done; 1 done, but some inputs were skipped (or a training
    run stopped); 2 nothing could be read, or the arguments, files or configuration are wrong;
    130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, OSError, ValueError) as err:  # InputError, CheckpointError: ValueErrors
        if args.debug or os.environ.get("VLM_DEBUG", "") not in ("", "0"):
            raise
        print(f"vlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
