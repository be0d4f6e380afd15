"""The ``vlm`` command line.

The CLI is the one place in ``vlm/`` that reaches into ``train/``, ``data/`` and ``eval/``,
and only inside the subcommand that needs them, so ``import vlm`` stays light.
"""

from __future__ import annotations

import argparse
import sys

from vlm.config import ConfigError


def _demo(args: argparse.Namespace) -> int:
    from train.random_demo import run

    run(out_dir=args.out, steps=args.steps, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm", description="Vision-language models: train, caption, ask.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a tiny model end to end and check it learned")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=150, help="optimizer steps (default: 150)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"vlm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
