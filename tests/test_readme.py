"""The README's code runs as written: every ```bash line and every ```python block of README.md.

``TABLE`` says how each one runs, keyed by the command (continuation lines joined, its comment
dropped) or, for a Python block, by its section and number. A block or line the table does not
know fails, and so does a table entry the README no longer has: new README code cannot go
untested.

Everything runs in README order in one sandbox directory (the working directory), which holds
tiny stand-ins at the paths the README names (``photo.jpg``, ``models/vicuna-7b``, the published
data files in their schemas, ...; see ``readme_sandbox.py``), so later lines find what earlier ones
wrote. ``vlm ...`` lines run in this process (``vlm.cli.main``), ``vlm serve`` and the Python
blocks in subprocesses. Where the real thing is too big for the CPU tests, a line gets test-only
arguments appended (``--max-steps 2``, tiny model sizes): the flags, paths and recipe keys as
written still have to work. The shapes data that ``vlm train`` and ``vlm demo`` generate on first
use comes at the sizes the README's ``vlm data shapes`` line is given here (``SHAPES_SIZES``).
One module fixture runs everything, whichever test asks first (about two minutes on two
cores); then each README line passes or fails on its own test.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import tiny
import torch
from readme_sandbox import make_sandbox

import vlm.train.trainer as trainer
from vlm.cli import build_parser, main
from vlm.data.shapes import generate, write_shapes

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VLM = Path(sys.executable).parent / "vlm"
#: One thread in this process and the ones it starts: the tiny models gain nothing from more, and
#: on a shared two-core machine OpenMP threads waiting for a busy core made `vlm bench` 15x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

#: The README's metavariables and what stands in for them (whole words of a command).
METAVARIABLES = {
    "DIR": "models/tiny",  # a model directory saved with its tokenizer (exports to LLaVA)
    "SHARDS": "shards/",
    "RECIPE.toml": "train/recipes/shapes.toml",
    "HOST": "127.0.0.1",
}
#: ``vlm data shapes`` here, and the data ``vlm train`` / ``vlm demo`` make on first use.
SHAPES_SIZES = dict(train=64, val=4, test=2)


# --- how each README line runs ------------------------------------------------------------------


@dataclass
class Run:
    """A ``vlm`` line, run in this process with ``extra`` appended; it must exit with ``code``.
    ``before`` prepares what the line needs that an earlier line overwrote; ``stdin`` is what
    the user types."""

    extra: tuple[str, ...] = ()
    code: int = 0
    stdin: str | None = None
    before: Callable[[Path], None] | None = None

    def run(self, command: str, sandbox: Path) -> None:
        argv = argv_of(command)
        assert argv[0] == "vlm", f"{command}: only vlm commands run in this process"
        if self.before is not None:
            self.before(sandbox)
        code, printed = run_vlm(argv[1:] + list(self.extra), self.stdin)
        assert code == self.code, f"exit code {code}, expected {self.code}; it printed:\n{printed[-5000:]}"


@dataclass
class Serve:
    """A ``vlm serve`` line: started on a free port (``--port`` replaced or appended), it must
    answer ``/health`` and list its model; then it is stopped."""

    def run(self, command: str, sandbox: Path) -> None:
        argv = argv_of(command)
        with serving(argv[1:], sandbox) as port:
            served = [m["id"] for m in get(f"http://127.0.0.1:{port}/v1/models")["data"]]
        assert served == [Path(argv[argv.index("--model") + 1]).name], served


@dataclass
class Python:
    """A Python block, run in a fresh interpreter in the sandbox. With ``server``, a ``vlm
    serve`` of those arguments runs meanwhile, and the block's port 8000 becomes its port."""

    server: tuple[str, ...] = ()

    def run(self, code: str, sandbox: Path) -> None:
        if not self.server:
            run_python(code, sandbox)
            return
        assert "127.0.0.1:8000/" in code, "the block no longer talks to port 8000"
        with serving(list(self.server), sandbox) as port:
            run_python(code.replace("127.0.0.1:8000/", f"127.0.0.1:{port}/"), sandbox)


@dataclass
class NotHere:
    """A line that cannot run here, and why. vlm's parser checks its arguments (the words after
    ``vlm`` or ``-m vlm.cli``), and ``instead``, when given, runs in the repository."""

    reason: str
    instead: tuple[str, ...] = ()

    def run(self, command: str, sandbox: Path) -> None:
        argv = argv_of(command)
        if argv[0] == "vlm" or "vlm.cli" in argv:  # make, pip and other tools' lines are not vlm's
            build_parser().parse_args(argv[argv.index("vlm.cli") + 1 :] if "vlm.cli" in argv else argv[1:])
        if self.instead:
            done = subprocess.run(
                self.instead, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, (
                f"{shlex.join(self.instead)}: exit code {done.returncode}\n{done.stderr}"
            )


TINY_RUN = ("--max-steps", "2")
TINY_BENCH = ("--size", "tiny", "--iters", "1", "--loader-images", "0")
#: The llava_stage1 recipe builds CLIP ViT-L/14-336 and trains at batch 256: here the session's
#: 2-layer CLIP (``tiny_clip``, its weights at the recipe's checkpoint path) at batch 2.
TINY_STAGE1 = (
    *("--set", f'model.encoder.model="{tiny.TINY_CLIP}"'),
    *("--set", "run.batch_size=2", "--set", "run.grad_accum=1", "--set", "data.num_workers=0"),
)
STAGE1 = (
    "--set model.decoder.pretrained='\"models/vicuna-7b\"' --set data.tokenizer='\"models/vicuna-7b\"' "
    "--set data.train='\"pretrain\"'"
)
#: Checked by vlm's parser; run instead, a command that shows the real one's steps or options.
TRAIN_HELP = (sys.executable, "-m", "vlm.cli", "train", "--help")


def copy_trained_model(sandbox: Path) -> None:
    """The demo's model (``make demo``, not run here): the shapes recipe's, trained above."""
    shutil.copytree(sandbox / "runs/shapes/model", sandbox / "runs/demo/train/model", dirs_exist_ok=True)


def user_captions(sandbox: Path) -> None:
    """``captions.jsonl`` as ``--captions`` reads it (``vlm caption --out`` wrote predictions there)."""
    rows = [{"image": f"{i}.png", "caption": generate("test", i).captions[0]} for i in range(4)]
    (sandbox / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


TABLE: dict[str, Run | Serve | Python | NotHere] = {
    "make demo": NotHere("trains for minutes: `make -n demo` shows its steps", ("make", "-n", "demo")),
    "make test": NotHere("runs this suite: `make -n test` shows its steps", ("make", "-n", "test")),
    # The demo
    "vlm data shapes --out runs/shapes-data": Run(tuple(f"--{k}={v}" for k, v in SHAPES_SIZES.items())),
    "vlm train train/recipes/shapes.toml": Run(TINY_RUN),
    "vlm eval --model runs/shapes/model --data runs/shapes-data/test --task vqa --out runs/shapes/eval": (
        Run()
    ),
    # Captioning and VQA
    "vlm caption photo.jpg more/photos/ --model runs/shapes/model": Run(),
    "vlm caption shards/ --model DIR --out captions.jsonl --num-beams 3": Run(),
    'vlm vqa photo.jpg --question "what color is the circle?" --model DIR': Run(),
    "Captioning and VQA, python block 1": Python(),
    # Conversations, few-shot prompts and chat
    "vlm chat --model runs/demo/train/model photo.png": Run(
        stdin="what is on the left?\n/quit\n", before=copy_trained_model
    ),
    'vlm vqa photo.png --question "what color is it?" --model DIR --support shots.jsonl --shots 2': Run(),
    "Conversations, few-shot prompts and chat, python block 1": Python(),
    # High-resolution images
    (
        "vlm train train/recipes/shapes.toml --out runs/shapes-anyres "
        "--set model.processor.tiling.name=anyres --set model.processor.tiling.max_tiles=4"
    ): Run(TINY_RUN),
    "vlm train train/recipes/shapes_highres.toml --out runs/highres-split": Run(TINY_RUN),
    (
        "vlm train train/recipes/shapes_highres.toml --out runs/highres-none "
        "--set model.processor.tiling.name=none"
    ): Run(TINY_RUN),
    (
        "vlm eval --model runs/highres-split/model --data runs/shapes-highres/test --task vqa "
        "--out runs/highres-split/eval"
    ): Run(),
    (
        "vlm eval --model runs/highres-none/model --data runs/shapes-highres/test --task vqa "
        "--out runs/highres-none/eval"
    ): Run(),
    # Training connectors
    "vlm data write --llava blip_laion_cc_sbu_558k.json --images llava-pretrain/ --out pretrain/": Run(),
    f"vlm train train/recipes/llava_stage1.toml --out runs/stage1 --max-steps 2000 {STAGE1}": Run(
        TINY_STAGE1 + TINY_RUN
    ),
    f"vlm train train/recipes/llava_stage1.toml --out runs/stage1 --max-steps 2000 --resume {STAGE1}": Run(
        TINY_STAGE1 + ("--max-steps", "3")  # the same settings, one step more than the run above
    ),
    (
        "vlm train train/recipes/llava_stage1.toml --out runs/stage1-cached --max-steps 2000 "
        f"--cache-features {STAGE1}"
    ): Run(TINY_STAGE1 + TINY_RUN),
    # Evaluation
    "vlm eval --model DIR --data SHARDS --task caption --out runs/eval": Run(),
    "vlm eval --predictions preds.jsonl --task vqa --out runs/eval": Run(),
    "pip install -c constraints.txt -e '.[lmms]'": NotHere(
        "installs packages: `make test` installs the lmms extra, and pip resolves it offline here",
        (
            sys.executable,
            "-c",
            "import importlib.metadata as m; assert 'lmms' in m.metadata('vlm').get_all('Provides-Extra')",
        ),
    ),
    (
        "lmms-eval --model vlm --model_args pretrained=runs/demo/train/model,device=cpu --tasks "
        "vqav2_val_lite --batch_size 8 --log_samples --output_path runs/lmms"
    ): NotHere(
        "downloads the task's dataset: tests/test_lmms_eval.py runs the same CLI offline on a local task",
        (sys.executable, "-c", "from vlm.eval.lmms import VLMEval"),
    ),
    (
        "vlm eval --model DIR --data vqav2-val/ --task vqa --shots 0,1,2,4 --support vqav2-train/ "
        "--out runs/fewshot"
    ): Run(),
    # Serving
    "vlm serve --model runs/demo/train/model": Serve(),
    "vlm serve --model DIR --port 9000 --max-batch-size 32 --local-images photos/": Serve(),
    "vlm serve --model DIR --max-batch-size 16 --max-waiting 64 --request-timeout 120": Serve(),
    (
        "vlm serve --model DIR --allow-remote-images --allow-private-image-hosts --remote-image-timeout 5"
    ): Serve(),
    "Serving, python block 1": Python(server=("serve", "--model", "runs/demo/train/model")),
    # Multi-GPU
    "torchrun --nproc-per-node 8 -m vlm.cli train train/recipes/llava_stage1.toml": NotHere(
        "8 GPUs", TRAIN_HELP
    ),
    (
        "torchrun --nnodes 2 --node-rank 0 --master-addr HOST --nproc-per-node 8 -m vlm.cli train RECIPE.toml"
    ): NotHere("2 nodes of 8 GPUs", TRAIN_HELP),
    # Data
    "vlm data write --images imgs/ --captions captions.jsonl --out shards/ --samples-per-shard 5000": Run(
        before=user_captions
    ),
    "vlm data write --images val2014/ --coco captions_val2014.json --out coco-captions/": Run(),
    "vlm data write --images imgs/ --vqa questions.json --out vqa/": Run(),
    "vlm data check shards/ --json": Run(),
    "vlm data write --llava llava_v1_5_mix665k.json --images llava-images/ --out instruct/": Run(),
    (
        "vlm data write --vqav2 v2_OpenEnded_mscoco_val2014_questions.json "
        "v2_mscoco_val2014_annotations.json --images coco/ --out vqav2-val/"
    ): Run(),
    (
        "vlm data write --coco-karpathy dataset_coco.json --split test --images coco/ --out karpathy-test/"
    ): Run(),
    (
        "vlm data write --obelics obelics-000.parquet --images downloaded/ --url-map downloaded/ "
        "--out obelics/"
    ): Run(),
    "vlm data write --mmc4 docs_shard_0_v2.jsonl --images mmc4-images/ --out mmc4/": Run(),
    # Build a model in Python
    "Build a model in Python, python block 1": Python(),
    "Build a model in Python, python block 2": Python(),
    # Benchmarks
    "vlm bench": NotHere("compiles three models' generation steps: minutes, even at --size tiny"),
    "vlm bench --defaults-only": Run(TINY_BENCH),
    "vlm bench --size large": NotHere("needs a GPU"),
    "vlm bench --profile idefics": Run(("--size", "tiny")),
    "vlm bench --options": NotHere("trains on the 20,000-sample shapes set for minutes"),
    "vlm bench --convert": Run(),
    "vlm bench --serve": NotHere("loads two servers for two minutes (tests/test_bench_serve.py: seconds)"),
    # Published checkpoints
    "vlm save --model path/to/llava-1.5-7b-hf --out runs/llava-vlm": Run(),
    'vlm vqa photo.jpg --question "what is in the picture?" --model runs/llava-vlm': Run(),
    # Back to transformers
    "vlm export --model DIR --to transformers --out runs/my-model-hf --check": Run(),
    "Back to transformers, python block 1": Python(),
    "vlm export --model runs/demo/train/model --out runs/demo/hf --check": Run(before=copy_trained_model),
    "Back to transformers, python block 2": Python(),
}


# --- reading the README -------------------------------------------------------------------------


@dataclass
class Item:
    """One thing to run: a bash command or a Python block, and where it stands in README.md."""

    key: str
    line: int
    language: str
    code: str  # the command (continuations joined) or the block's source


@dataclass
class Fence:
    language: str
    line: int  # of its first code line
    section: str
    code: str


def fences(text: str) -> list[Fence]:
    """Every fenced block, with the heading it stands under."""
    found, section, lines, i = [], "", text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("#"):
            section = lines[i].lstrip("#").strip()
        elif lines[i].startswith("```"):
            end = lines.index("```", i + 1)
            found.append(Fence(lines[i][3:].strip(), i + 2, section, "\n".join(lines[i + 1 : end]) + "\n"))
            i = end
        i += 1
    return found


def commands(fence: Fence) -> list[tuple[int, str]]:
    """A bash block's commands: continuation lines joined, comments and blank lines dropped."""
    found, pending, start = [], "", 0
    for number, line in enumerate(fence.code.splitlines(), fence.line):
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        command = re.sub(r"(^|\s)#.*$", "", pending + line.strip()).strip()
        pending = ""
        if command:
            found.append((start, " ".join(command.split())))
    return found


def readme_items(text: str) -> list[Item]:
    items, python_blocks = [], {}
    for fence in fences(text):
        if fence.language == "bash":
            items += [Item(command, line, "bash", command) for line, command in commands(fence)]
        elif fence.language == "python":
            n = python_blocks[fence.section] = python_blocks.get(fence.section, 0) + 1
            items.append(Item(f"{fence.section}, python block {n}", fence.line, "python", fence.code))
    return items


ITEMS = readme_items(README.read_text())


# --- running ------------------------------------------------------------------------------------


def argv_of(command: str) -> list[str]:
    """The command's words, metavariables replaced by their stand-ins."""
    return [METAVARIABLES.get(word, word) for word in shlex.split(command)]


def run_vlm(argv: list[str], stdin: str | None = None) -> tuple[int, str]:
    """``vlm ARGV`` in this process: its exit code and everything it printed."""
    printed = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(printed))
        stack.enter_context(contextlib.redirect_stderr(printed))
        if stdin is not None:
            stack.enter_context(pytest.MonkeyPatch.context()).setattr(sys, "stdin", io.StringIO(stdin))
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, printed.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def serving(argv: list[str], cwd: Path):
    """``vlm serve ARGV`` on a free port until the block ends; yields the port."""
    port = free_port()
    if "--port" in argv:
        argv = list(argv)
        argv[argv.index("--port") + 1] = str(port)
    else:
        argv = [*argv, "--port", str(port)]
    log = cwd / f"serve-{port}.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(VLM), *argv], cwd=cwd, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise AssertionError(f"vlm serve exited with {server.returncode}:\n{log.read_text()}")
            try:
                get(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"vlm serve did not answer /health in 120 s:\n{log.read_text()}"
                    ) from None
                time.sleep(0.25)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_python(code: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"exit code {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_clip) -> dict[str, str | None]:
    """Runs every README item in order in one sandbox: ``key -> None`` (it ran) or the error."""
    sandbox = tmp_path_factory.mktemp("readme")
    make_sandbox(sandbox)
    results, times = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch, contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, threads)
        patch.chdir(sandbox)
        patch.setattr(trainer, "write_shapes", functools.partial(write_shapes, **SHAPES_SIZES))
        for item in ITEMS:
            how = TABLE.get(item.key)
            if how is None:
                results[item.key] = "not in the table"
                continue
            start = time.perf_counter()
            try:
                how.run(item.code, sandbox)
                results[item.key] = None
            except Exception:  # noqa: BLE001  (each item reports its own failure)
                results[item.key] = traceback.format_exc(limit=-8)
            times[item.key] = time.perf_counter() - start
    slowest = sorted(times.items(), key=lambda kv: -kv[1])[:8]
    print("slowest README items: " + ", ".join(f"{t:.1f}s {k[:50]!r}" for k, t in slowest))
    return results


# --- the tests ----------------------------------------------------------------------------------


def test_every_readme_block_and_line_has_an_entry_in_the_table():
    languages = {fence.language for fence in fences(README.read_text())}  # "": the layout diagrams
    assert languages <= {"", "bash", "python"}, f"code blocks in other languages: {languages}"
    keys = [i.key for i in ITEMS]
    assert len(keys) == len(set(keys)), "a README command stands twice: give the second its own words"
    unknown = [f"README.md:{i.line}: {i.key}" for i in ITEMS if i.key not in TABLE]
    assert not unknown, (
        "README code that tests/test_readme.py's TABLE does not say how to run:\n" + "\n".join(unknown)
    )
    stale = set(TABLE) - {i.key for i in ITEMS}
    assert not stale, f"TABLE entries the README no longer has: {sorted(stale)}"


@pytest.mark.parametrize("item", ITEMS, ids=[f"L{i.line}:{i.key[:60]}" for i in ITEMS])
def test_the_readme_line_runs(item, outcomes):
    error = outcomes[item.key]
    assert error is None, f"README.md:{item.line}: {item.key}\n{error}"
