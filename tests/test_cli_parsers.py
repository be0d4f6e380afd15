"""The command line's parsers: they start at once (no torch until a command runs), every option
says what it does and shows its default, and every command's handler resolves."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import vlm
from vlm.cli import build_parser, main
from vlm.eval import bench
from vlm.eval.cli import BENCH_SIZES
from vlm.subcommand import Handler

HEAVY = ("torch", "torchvision", "transformers", "open_clip", "webdataset", "PIL", "uvicorn", "fastapi")

#: Runs ``main`` on each argv (help, a command's help, an argparse error) in a fresh process and
#: prints the heavy packages imported by then.
PROBE = """
import sys
from vlm.cli import main
for argv in (["--help"], ["caption", "--help"], ["data", "check", "--help"], ["caption"], ["train"]):
    try:
        main(argv)
    except SystemExit:
        pass
print(sorted({name.split(".")[0] for name in sys.modules} & set(sys.argv[1:])))
"""


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every runnable command's parser (``("data", "check")``, ...), through nested subparsers."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
    for action in subparsers:
        for name, sub in action.choices.items():
            yield from commands(sub, (*path, name))


COMMANDS = dict(commands(build_parser()))


def test_help_and_argparse_errors_import_no_torch():
    out = subprocess.run([sys.executable, "-c", PROBE, *HEAVY], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
    assert "usage: vlm caption" in out.stdout and "the following arguments are required" in out.stderr


def test_python_m_vlm_cli_runs_the_command_line():
    out = subprocess.run([sys.executable, "-m", "vlm.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"vlm {vlm.__version__}"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"vlm {vlm.__version__}"


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_handler_resolves_to_a_function(path):
    handler = COMMANDS[path].get_default("func")
    assert isinstance(handler, Handler) and callable(handler.resolve())


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_option_says_what_it_does_and_shows_its_default(path):
    parser = COMMANDS[path]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"vlm {' '.join(path)} {action.option_strings[0]} has no help text"
        if action.default not in (None, False, []):
            assert f"default: {action.default}" in text or "default: " in action.help, (
                f"vlm {' '.join(path)} {action.option_strings[0]}: its default is not shown"
            )


def test_bench_sizes_are_the_benchmarks():
    assert tuple(bench.SIZES) == BENCH_SIZES


def test_bench_writes_under_runs_unless_told(tmp_path, capsys):
    args = build_parser().parse_args(["bench"])
    assert args.out == "runs/bench"
    code = main(["bench", "--models", "llava", "llama", "--out", str(tmp_path)])
    assert code == 2 and "--models: unknown model(s) 'llama'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
