"""What ``vlm train`` runs (its parser is in ``vlm.train.cli``)."""

from __future__ import annotations

import argparse
import json
import sys

from vlm.train.recipe import load_recipe
from vlm.train.trainer import TrainingError, train


def train_command(args: argparse.Namespace) -> int:
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
