"""What every ``vlm`` subcommand shares. Each package adds its own subcommands with
:func:`add_subcommand` (``vlm.data.cli``, ``vlm.train.cli``, ``vlm.eval.cli``); ``vlm.cli``
gathers them.

A parser names its handler as ``"module:function"``, imported only when the command runs: the
parsers import argparse and nothing heavy, so ``vlm --help`` and argparse's errors come at once,
and the handlers' modules import what they use at their top, where the layer contracts see it.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any


class Handler:
    """A subcommand's handler, ``"package.module:function"`` (``args -> exit code``), imported
    when it is called."""

    def __init__(self, target: str):
        module, sep, name = target.partition(":")
        if not sep or not module or not name:
            raise ValueError(f"a handler is 'package.module:function', got {target!r}")
        self.target = target

    def resolve(self) -> Any:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, args: argparse.Namespace) -> int:
        return self.resolve()(args)

    def __repr__(self) -> str:
        return f"Handler({self.target!r})"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default shown after its text, unless the text says
    it already, or there is none to show (``None``, ``False``, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or default == []
            or not action.option_strings
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def add_subcommand(commands, name: str, *, handler: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser, with the options every command takes, run by ``handler``
    (``"package.module:function"``, see :class:`Handler`)."""
    parser = commands.add_parser(name, formatter_class=HelpFormatter, **kwargs)
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (or set VLM_DEBUG=1)"
    )
    parser.set_defaults(func=Handler(handler))
    return parser
