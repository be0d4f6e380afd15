"""What every ``vlm`` subcommand shares. Each package adds its own subcommands with
:func:`add_subcommand` (``vlm.data.cli``, ``vlm.train.cli``, ``vlm.eval.cli``); ``vlm.cli``
gathers them."""

from __future__ import annotations

import argparse


def add_subcommand(commands, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser, with the options every command takes. Set ``func`` (``args -> exit
    code``) with ``set_defaults``."""
    parser = commands.add_parser(name, **kwargs)
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (or set VLM_DEBUG=1)"
    )
    return parser
