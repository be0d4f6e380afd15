"""``vlm train``."""

from __future__ import annotations

import argparse
import json
import sys

from vlm.subcommand import add_subcommand
from vlm.train.recipe import load_recipe
from vlm.train.trainer import TrainingError, train


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = add_subcommand(commands, "train", help="train a model from a recipe (train/recipes/*.toml)")
    parser.add_argument("recipe", help="recipe TOML file")
    parser.add_argument("--max-steps", type=int, default=None, help="override run.max_steps")
    parser.add_argument("--out", default=None, help="override run.out, the run directory")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the run directory's last checkpoint"
    )
    parser.add_argument(
        "--cache-features", action="store_true", help="train from cached frozen-encoder features"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any recipe key (repeatable)"
    )
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
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
