"""torchrun: two processes (gloo, CPU) give the losses of one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_train import losses, tiny_recipe

from train.recipe import recipe_from_dict
from train.trainer import train


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


def test_two_processes_match_one(shapes_dir, tmp_path):
    tree = tiny_recipe(shapes_dir, tmp_path / "one", max_steps=5)
    tree["model"]["decoder"]["hf_config"].update(
        resid_pdrop=0.0, embd_pdrop=0.0
    )  # RNG streams differ per rank
    tree["data"]["split"] = "example"
    train(recipe_from_dict(tree), progress=False)

    tree["run"]["out"] = str(tmp_path / "two")
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text(toml(tree))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "vlm.cli", "train", str(recipe_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5
