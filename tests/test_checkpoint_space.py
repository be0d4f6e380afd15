"""A checkpoint that does not fit on its disk: the run stops (exit 1) with one message naming the
checkpoint's directory and the space it needs, the previous checkpoint is intact and loadable,
no partial directory is left, and ``--resume`` continues with the uninterrupted run's losses.

Twice: with ENOSPC raised halfway through a write (injected into the write path), and on a real
disk that fills (a small tmpfs mounted here; skipped where mounting is refused). ``vlm train``
runs in this process (``vlm.cli.main``: the exit code and stderr a user gets), which keeps the
five runs short."""

import contextlib
import errno
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import toml
from test_train import losses, tiny_recipe

import vlm.train.checkpoint as checkpoint_module
from vlm.cli import main
from vlm.train.checkpoint import STATE, WEIGHTS, checkpoints

STEPS, EVERY = 6, 2


def vlm_train(capfd, recipe, *extra):
    """``vlm train RECIPE ...``: (exit code, stderr)."""
    capfd.readouterr()
    code = main(["train", str(recipe), *extra])
    return code, capfd.readouterr().err


def full_at_second_save(monkeypatch):
    """The disk fills halfway through the second checkpoint's state.pt."""
    real_save, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"PK half a zip")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)


def write_recipe(shapes_dir, tmp_path, name, out):
    tree = tiny_recipe(shapes_dir, out, max_steps=STEPS, save_every=EVERY, keep_last=2)
    path = tmp_path / f"{name}.toml"
    path.write_text(toml(tree))
    return path


@pytest.fixture(scope="module")
def straight(shapes_dir, tmp_path_factory):
    """The uninterrupted run: its directory."""
    tmp = tmp_path_factory.mktemp("straight")
    assert main(["train", str(write_recipe(shapes_dir, tmp, "straight", tmp / "run"))]) == 0
    assert len(losses(tmp / "run")) == STEPS
    return tmp / "run"


def assert_stopped_cleanly(run_dir, code, err):
    """Exit 1, one message naming the checkpoint that failed and the space it needs; ckpt-2
    intact and loadable, nothing partial left."""
    assert code == 1, err[-3000:]
    assert err.count("vlm train:") == 1 and "Traceback" not in err, err[-3000:]
    message = err[err.index("vlm train:") :].splitlines()[0]
    assert str(run_dir / "ckpt-00000004") in message and "no space left" in message, message
    assert "needs about" in message and " MB" in message and "ckpt-00000002" in message, message
    assert [p.name for p in checkpoints(run_dir)] == ["ckpt-00000002"]
    assert not [p for p in run_dir.glob("ckpt-*") if p.name != "ckpt-00000002"]  # no .tmp, no .del
    previous = run_dir / "ckpt-00000002"
    assert load_file(previous / WEIGHTS) and torch.load(previous / STATE, weights_only=True)["step"] == 2
    assert len(losses(run_dir)) == 4


def resume_and_compare(capfd, recipe, run_dir, straight):
    code, err = vlm_train(capfd, recipe, "--resume")
    assert code == 0, err[-3000:]
    assert losses(run_dir) == losses(straight)
    assert [p.name for p in checkpoints(run_dir)] == ["ckpt-00000004", "ckpt-00000006"]


def test_disk_full_halfway_through_a_checkpoint(shapes_dir, tmp_path, straight, capfd, monkeypatch):
    run_dir = tmp_path / "run"
    recipe = write_recipe(shapes_dir, tmp_path, "full", run_dir)
    with monkeypatch.context() as patched:
        full_at_second_save(patched)
        code, err = vlm_train(capfd, recipe)
    assert_stopped_cleanly(run_dir, code, err)
    assert losses(run_dir) == losses(straight)[:4]
    resume_and_compare(capfd, recipe, run_dir, straight)


def du(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def tmpfs(path, size):
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts are Linux's")
def test_a_real_disk_that_fills(shapes_dir, tmp_path, straight, capfd):
    """The disk holds the run's logs and one checkpoint, not two: the second is refused."""
    one = du(straight / "ckpt-00000002")
    logs = du(straight) - sum(du(p) for p in checkpoints(straight)) - du(straight / "model")
    size = ((one * 3 // 2 + logs + 2**20) // 4096 + 1) * 4096
    with tmpfs(tmp_path / "disk", size) as disk:
        run_dir = disk / "run"
        recipe = write_recipe(shapes_dir, tmp_path, "tmpfs", run_dir)
        code, err = vlm_train(capfd, recipe)
        assert_stopped_cleanly(run_dir, code, err)
        grown = subprocess.run(["mount", "-o", f"remount,size={size * 4}", str(disk)], capture_output=True)
        assert grown.returncode == 0, grown.stderr
        resume_and_compare(capfd, recipe, run_dir, straight)


def test_an_error_other_than_space_is_not_called_full(tmp_path, monkeypatch):
    """A write that fails for another reason keeps its own error (and leaves nothing partial)."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def denied(obj, path, *args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint_module.torch, "save", denied)
    with pytest.raises(PermissionError):
        checkpoint_module.save_checkpoint(
            tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler, state={}
        )
    assert not list(tmp_path.glob("ckpt-*"))
