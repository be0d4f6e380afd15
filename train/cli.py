"""``vlm train``: the parser (``vlm.train.commands`` runs it)."""

from __future__ import annotations

import argparse

from vlm.subcommand import add_subcommand


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = add_subcommand(
        commands,
        "train",
        handler="vlm.train.commands:train_command",
        help="train a model from a recipe (train/recipes/*.toml)",
    )
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
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any recipe key (repeatable): VALUE as TOML, checked against the "
        "key's type; null unsets an optional key",
    )
