"""The ``vlm`` command line: the one module above every package.

Each package contributes its own subcommands (``vlm.data.cli``, ``vlm.train.cli``,
``vlm.eval.cli``); the commands that span packages (``demo``) or need only the model core
(``save``, ``export``) are parsed here and run by ``vlm.cli.commands``. Parsers name their
handlers (``vlm.subcommand.Handler``), imported only when the command runs, so that ``vlm
--help`` and argparse's errors do not wait for torch.
"""

from __future__ import annotations

import argparse
import os
import sys

import vlm
from vlm.data import cli as data_cli
from vlm.eval import cli as eval_cli
from vlm.schema import ConfigError
from vlm.subcommand import add_subcommand
from vlm.train import cli as train_cli

#: The packages' subcommands, in the order ``vlm --help`` lists them after demo and save.
PACKAGES = (eval_cli, train_cli, data_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm", description="Vision-language models: train, caption, ask.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {vlm.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = add_subcommand(
        commands,
        "demo",
        handler="vlm.cli.commands:demo_command",
        help="make the shapes data, train the default model, evaluate it",
    )
    demo.add_argument("--out", default="runs/demo", help="run directory")
    demo.add_argument("--recipe", help="a recipe TOML file (default: the shipped shapes.toml)")
    demo.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key (repeatable): VALUE as TOML, checked against the "
        "key's type; null unsets an optional key",
    )

    save = add_subcommand(
        commands,
        "save",
        handler="vlm.cli.commands:save_command",
        help="write a model (vlm, or transformers LLaVA / BLIP-2 / IDEFICS) in vlm's format",
    )
    save.add_argument("--model", required=True, help="a model directory")
    save.add_argument("--out", required=True, help="where to write the vlm model")
    save.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="cast the weights (default: keep the checkpoint's dtype)",
    )

    export = add_subcommand(
        commands,
        "export",
        handler="vlm.cli.commands:export_command",
        help="write a vlm model as a transformers checkpoint it runs in (LLaVA, LLaVA-NeXT, OneVision, "
        "BLIP-2, IDEFICS, Idefics3 or SmolVLM)",
    )
    export.add_argument("--model", required=True, help="a vlm model directory, with its tokenizer")
    export.add_argument("--to", default="transformers", choices=["transformers"], help="the target")
    export.add_argument("--out", required=True, help="where to write the checkpoint")
    export.add_argument(
        "--as",
        dest="format",
        metavar="FORMAT",
        help="the format, where several take the model: a name (smolvlm) or an architecture "
        "(SmolVLMForConditionalGeneration); default: the first that takes it (idefics3 before smolvlm)",
    )
    export.add_argument(
        "--check",
        action="store_true",
        help="then load it with transformers and compare its logits with vlm's on a probe batch",
    )

    for package in PACKAGES:
        package.add_commands(commands)
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
