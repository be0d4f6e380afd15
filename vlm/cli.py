"""The ``vlm`` command line.

The CLI is the one place in ``vlm/`` that reaches into ``train/``, ``data/`` and ``eval/``,
and only inside the subcommand that needs them, so ``import vlm`` stays light.
"""

from __future__ import annotations

import argparse
import json
import sys

from vlm.config import ConfigError


def _demo(args: argparse.Namespace) -> int:
    from train.random_demo import run

    run(out_dir=args.out, steps=args.steps, seed=args.seed)
    return 0


def _data(args: argparse.Namespace) -> int:
    from data import commands

    if args.data_command == "check":
        report = commands.check(args.shards, as_json=args.json, max_pixels=args.max_pixels)
        return 0 if report["ok"] > 0 else 1
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
    from data.shapes import write_shapes

    manifest = write_shapes(
        args.out, seed=args.seed, train=args.train, val=args.val, test=args.test, image_size=args.image_size
    )
    print(json.dumps({k: manifest[k] for k in ("counts", "held_out") if k in manifest}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from train.recipe import load_recipe
    from train.trainer import TrainingError, train

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm", description="Vision-language models: train, caption, ask.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a tiny model end to end and check it learned")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=150, help="optimizer steps (default: 150)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    train = commands.add_parser("train", help="train a model from a recipe (train/recipes/*.toml)")
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
    check = data_commands.add_parser("check", help="read shards as training would and report what it gets")
    check.add_argument("shards", nargs="+", help="shard files, directories, globs or brace patterns")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument("--max-pixels", type=int, default=None, help="decompression-bomb limit")

    write = data_commands.add_parser("write", help="write shards from images and their texts")
    write.add_argument("--out", required=True, help="output directory")
    write.add_argument("--images", required=True, help="image folder the texts refer to")
    source = write.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", help="JSONL / CSV / JSON list of {image, caption(s)}")
    source.add_argument("--coco", help="COCO captions annotation JSON")
    source.add_argument("--vqa", help="JSON / JSONL of {image, question, answers}")
    write.add_argument("--prefix", default="shard")
    write.add_argument("--samples-per-shard", type=int, default=1000)
    write.add_argument("--num-shards", type=int, default=None, help="spread samples over this many shards")

    shapes = data_commands.add_parser("shapes", help="generate the synthetic shapes dataset")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--train", type=int, default=20000)
    shapes.add_argument("--val", type=int, default=500)
    shapes.add_argument("--test", type=int, default=500)
    shapes.add_argument("--image-size", type=int, default=64)
    data.set_defaults(func=_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"vlm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
