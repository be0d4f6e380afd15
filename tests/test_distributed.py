"""torchrun: two processes (gloo, CPU) give the losses of one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import losses, tiny_recipe

from vlm.train.recipe import recipe_from_dict
from vlm.train.trainer import train


def toml(tree, prefix=""):
    """A small TOML writer for recipe dicts (tables, strings, numbers, booleans, flat lists)."""
    lines, tables = [], []
    for key, value in tree.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    text = (f"[{prefix}]\n" if prefix and lines else "") + "".join(line + "\n" for line in lines)
    for key, value in tables:
        text += toml(value, f"{prefix}.{key}" if prefix else key)
    return text


@pytest.mark.parametrize("lm", ["trainable", "frozen"])  # FSDP2 shards a trainable LM; DDP otherwise
def test_two_processes_match_one(shapes_dir, tmp_path, lm):
    tree = tiny_recipe(shapes_dir, tmp_path / "one", max_steps=5)
    tree["model"]["decoder"]["hf_config"].update(
        resid_pdrop=0.0, embd_pdrop=0.0
    )  # RNG streams differ per rank
    tree["model"]["decoder"]["freeze"] = lm == "frozen"
    tree["data"]["split"] = "example"
    train(recipe_from_dict(tree), progress=False)

    tree["run"]["out"] = str(tmp_path / "two")
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text(toml(tree))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "vlm.cli",
        "train",
        str(recipe_file),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parent.parent
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5
    # the checkpoint and the export hold the full (gathered) weights
    a, b = (
        load_file(tmp_path / "one" / "model" / "model.safetensors"),
        load_file(tmp_path / "two" / "model" / "model.safetensors"),
    )
    # Adam magnifies summation-order noise in near-zero gradients: weights agree to 1e-4
    assert a.keys() <= b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    for extra in b.keys() - a.keys():  # the gathered export also names tied weights (GPT-2's wte)
        assert any(torch.equal(b[extra], b[k]) for k in a)
    from vlm import from_pretrained

    assert from_pretrained(tmp_path / "two" / "model").tokens_per_image == 16
    ckpt_one = load_file(tmp_path / "one" / "ckpt-00000005" / "trainable.safetensors")
    ckpt_two = load_file(tmp_path / "two" / "ckpt-00000005" / "trainable.safetensors")
    assert ckpt_one.keys() == ckpt_two.keys() and all(
        torch.allclose(ckpt_one[k], ckpt_two[k], atol=1e-4) for k in ckpt_one
    )
    if lm == "trainable":  # the sharded checkpoint loads back into sharded models and training goes on
        resumed = subprocess.run(
            [*command, "--resume", "--max-steps", "7"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            cwd=Path(__file__).parent.parent,
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        log = losses(tmp_path / "two")
        assert len(log) == 7 and log[:5] == two and all(v == v for v in log)
