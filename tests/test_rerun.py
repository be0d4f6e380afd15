"""A new run in an earlier run's directory, and --resume with other settings than the run's."""

import json
import logging

import pytest
from test_train import losses, tiny_recipe

from vlm import ConfigError
from vlm.train.checkpoint import checkpoints, load_checkpoint
from vlm.train.logs import read_log
from vlm.train.recipe import recipe_from_dict
from vlm.train.trainer import build_training_model, recipe_tokenizer, train


def names(run_dir):
    return [p.name for p in checkpoints(run_dir)]


def test_a_new_run_moves_the_earlier_one_aside_and_resume_continues_the_new_one(shapes_dir, tmp_path, caplog):
    """6 steps, then 4 into the same directory (save every 2, keep 2): the new run's
    checkpoints stay (pruning once deleted them: the old run's sort after them), the old run
    is whole in previous-1, and --resume continues the new run, not the old one."""
    out = tmp_path / "run"

    def recipe(max_steps):
        return recipe_from_dict(tiny_recipe(shapes_dir, out, max_steps=max_steps, save_every=2, keep_last=2))

    train(recipe(6), progress=False)
    old_log = (out / "log.jsonl").read_text()
    assert names(out) == ["ckpt-00000004", "ckpt-00000006"]

    with caplog.at_level(logging.WARNING, logger="vlm.train.trainer"):
        train(recipe(4), progress=False)
    aside = out / "previous-1"
    assert names(out) == ["ckpt-00000002", "ckpt-00000004"]
    assert [line for line in caplog.messages if "earlier run" in line] == [
        f"{out} holds an earlier run (last checkpoint ckpt-00000006): moved it to {aside} to start a "
        f"new one; continue that one with --out {aside} --resume"
    ]
    # The earlier run, whole: checkpoints, model, logs and recipe.
    assert names(aside) == ["ckpt-00000004", "ckpt-00000006"]
    assert (aside / "log.jsonl").read_text() == old_log and len(read_log(aside / "log.jsonl")) == 6
    assert json.loads((aside / "recipe.json").read_text())["run"]["max_steps"] == 6
    assert (aside / "model" / "config.json").is_file() and (aside / "summary.json").is_file()
    tokenizer = recipe_tokenizer(str(shapes_dir / "tokenizer"))
    state = load_checkpoint(aside / "ckpt-00000006", model=build_training_model(recipe(6), tokenizer))
    assert state["step"] == 6
    assert json.loads((out / "recipe.json").read_text())["run"]["max_steps"] == 4

    new_losses = losses(out)
    assert len(new_losses) == 4
    summary = train(recipe(8), resume=True, progress=False)  # continues the new run from step 4
    assert summary["steps"] == 8
    assert [r["step"] for r in read_log(out / "log.jsonl")] == list(range(1, 9))
    assert losses(out)[:4] == new_losses
    assert names(out) == ["ckpt-00000006", "ckpt-00000008"] and names(aside)[-1] == "ckpt-00000006"

    train(recipe(2), progress=False)  # a third run: the second goes to previous-2
    assert names(out / "previous-2") == ["ckpt-00000006", "ckpt-00000008"]
    assert names(aside) == ["ckpt-00000004", "ckpt-00000006"] and names(out) == ["ckpt-00000002"]
    # The earlier run resumes where it was moved, as the warning says.
    moved = tiny_recipe(shapes_dir, aside, max_steps=8, save_every=2, keep_last=2)
    assert train(recipe_from_dict(moved), resume=True, progress=False)["steps"] == 8
    assert losses(aside)[:6] == [json.loads(line)["loss"] for line in old_log.splitlines()]


def test_resume_refuses_other_settings_naming_them_and_takes_more_steps(shapes_dir, tmp_path, caplog):
    out = tmp_path / "run"

    def recipe(**run):
        return tiny_recipe(shapes_dir, out, **{"max_steps": 4, "save_every": 2, **run})

    train(recipe_from_dict(recipe()), progress=False)
    before = (out / "recipe.json").read_text(), (out / "log.jsonl").read_text(), names(out)

    other = recipe(batch_size=4)
    other["optim"]["lr"] = 1e-3
    with pytest.raises(ConfigError) as err:
        train(recipe_from_dict(other), resume=True, progress=False)
    message = str(err.value)
    assert "optim.lr: 0.003 in the run, 0.001 now" in message
    assert "run.batch_size: 8 in the run, 4 now" in message
    assert "max_steps" not in message and str(out / "recipe.json") in message

    with pytest.raises(ConfigError, match=r"run\.max_steps: 4 in the run, 3 now, below its step 4"):
        train(recipe_from_dict(recipe(max_steps=3)), resume=True, progress=False)
    assert ((out / "recipe.json").read_text(), (out / "log.jsonl").read_text(), names(out)) == before

    # More steps (and how often it saves and logs) may change: that is how a run is extended.
    with caplog.at_level(logging.WARNING, logger="vlm.train.trainer"):
        summary = train(recipe_from_dict(recipe(max_steps=6, log_every=1)), resume=True, progress=False)
    assert summary["steps"] == 6 and [r["step"] for r in read_log(out / "log.jsonl")] == list(range(1, 7))
    schedule = "run.max_steps is 6, the run's was 4: the learning-rate schedule now ends at step 6"
    assert schedule in caplog.messages
    assert not (out / "previous-1").exists()
