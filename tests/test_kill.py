"""`vlm train` killed with SIGKILL at random moments, once in the middle of a checkpoint write,
then resumed until it finishes: the per-step losses are those of a run never interrupted."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_distributed import toml
from test_train import losses, tiny_recipe

from vlm.train.checkpoint import checkpoints

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Runs `vlm train`, but the second checkpoint's state.pt is half written when the process
# SIGKILLs itself: no exception, no cleanup, exactly what a kill at that moment leaves.
DIES_WHILE_SAVING = """
import os, signal, sys
import vlm.train.checkpoint as checkpoint
calls = []
def save(obj, path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 2:
        with open(path, "wb") as f:
            f.write(b"PK half a zip")
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)
real_save, checkpoint.torch.save = checkpoint.torch.save, save
from vlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def vlm_train(recipe, *extra, patch=None):
    """``vlm train RECIPE ...`` in a new process; its stderr goes to a file beside the recipe."""
    command = [sys.executable, "-c", patch or "from vlm.cli import main; import sys; sys.exit(main())"]
    with open(recipe.with_suffix(".stderr"), "a") as stderr:  # a file: a full pipe would block it
        return subprocess.Popen(
            [*command, "train", str(recipe), *extra],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def tail(recipe):
    return recipe.with_suffix(".stderr").read_text()[-3000:]


def last_step(run_dir):
    steps = [int(p.name.removeprefix("ckpt-")) for p in checkpoints(run_dir)]
    return max(steps, default=0)


def wait_for_a_step_after(run_dir, step, proc, timeout=120):
    """Until the log records a step past ``step`` (the resumed run is training), or it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        lines = (run_dir / "log.jsonl").read_text().splitlines() if (run_dir / "log.jsonl").exists() else []
        if len(lines) > step:
            return
        time.sleep(0.02)


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_losses(shapes_dir, tmp_path):
    def recipe(name):
        tree = tiny_recipe(shapes_dir, tmp_path / name, max_steps=16, save_every=2, keep_last=2)
        path = tmp_path / f"{name}.toml"
        path.write_text(toml(tree))
        return path

    straight = vlm_train(recipe("straight"))
    assert straight.wait(timeout=300) == 0, tail(tmp_path / "straight.toml")

    run_dir, killed = tmp_path / "killed", recipe("killed")
    saving = vlm_train(killed, patch=DIES_WHILE_SAVING)
    assert saving.wait(timeout=300) == -signal.SIGKILL, tail(killed)
    assert last_step(run_dir) == 2 and list(run_dir.glob("ckpt-*.tmp"))  # the half-written one

    rng, kills = random.Random(0), 1
    for _ in range(3):  # three more kills, each a random moment into a resumed run's steps
        proc = vlm_train(killed, "--resume")
        wait_for_a_step_after(run_dir, last_step(run_dir), proc)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)

    for _ in range(5):  # resume until it finishes
        proc = vlm_train(killed, "--resume")
        code = proc.wait(timeout=300)
        if code == 0:
            break
    assert code == 0, tail(killed)
    assert kills >= 3, "the runs finished before they could be killed: lengthen them"
    expected, got = losses(tmp_path / "straight"), losses(run_dir)
    assert len(expected) == len(got) == 16 and got == expected
    assert (run_dir / "model" / "model.safetensors").is_file() and last_step(run_dir) == 16
