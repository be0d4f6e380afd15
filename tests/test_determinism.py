"""The same recipe and seed train the same model, bit for bit, on one machine: with the demo's
data settings (a loader worker, a shuffle buffer, packed turns and rows, all three kinds of
data), across epochs and checkpoints, in another run directory or in the same one again."""

import torch
from test_train import tiny_recipe

from vlm.train.logs import read_log
from vlm.train.recipe import recipe_from_dict
from vlm.train.trainer import train


def demo_like(shapes_dir, out):
    tree = tiny_recipe(shapes_dir, out, max_steps=12, save_every=5)
    tree["model"]["processor"]["chat"] = True
    tree["data"].update(
        train=[str(shapes_dir / d) for d in ("train", "conversations/train", "documents/train")],
        tasks=["caption", "vqa", "chat", "document"],
        pack_turns=True,
        pack_length=128,
        shuffle_buffer=32,
        num_workers=1,
    )
    return recipe_from_dict(tree)


def records(run_dir):
    fields = ("step", "loss", "grad_norm", "tokens", "epoch")
    return [tuple(r[f] for f in fields) for r in read_log(run_dir / "log.jsonl")]


def test_training_twice_gives_the_same_losses_bit_for_bit(shapes_dir, tmp_path):
    first = train(demo_like(shapes_dir, tmp_path / "a"), progress=False)
    train(demo_like(shapes_dir, tmp_path / "b"), progress=False)
    train(demo_like(shapes_dir, tmp_path / "a"), progress=False)  # the first run is moved aside

    runs = [records(tmp_path / "b"), records(tmp_path / "a"), records(tmp_path / "a" / "previous-1")]
    assert runs[0][-1][-1] >= 1, "the runs should cross an epoch boundary"
    assert runs[0] == runs[1] == runs[2]  # exact equality of float losses and gradient norms
    assert first["numerics"] == {
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
