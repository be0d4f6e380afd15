"""Training: exact resume, crash-safe checkpoints, non-finite losses, recipe errors."""

import json
import shutil

import pytest
import torch
from test_data_pipeline import write_tar

import vlm.train.checkpoint as checkpoint_module
from vlm import ConfigError
from vlm.model import VisionLanguageModel
from vlm.train.checkpoint import CheckpointError, checkpoints, load_checkpoint
from vlm.train.logs import read_log
from vlm.train.recipe import load_recipe, recipe_from_dict
from vlm.train.trainer import TrainingError, build_training_model, recipe_tokenizer, train


def tiny_recipe(shapes_dir, out, **run):
    tree = {
        "model": {
            "encoder": {
                "name": "vit",
                "image_size": 32,
                "patch_size": 8,
                "width": 32,
                "depth": 2,
                "num_heads": 2,
                "feature_layer": -1,
                "freeze": False,
            },
            "bridge": {"name": "mlp2x_gelu"},
            "decoder": {
                "name": "hf",
                "freeze": False,
                "hf_config": {
                    "model_type": "gpt2",
                    "n_layer": 2,
                    "n_embd": 32,
                    "n_head": 2,
                    "n_positions": 128,
                    "resid_pdrop": 0.1,
                    "embd_pdrop": 0.1,
                    "attn_pdrop": 0.0,
                },
            },  # dropout: RNG state matters
            "processor": {
                "max_length": 128,
                "resize": "pad",
                "templates": {"caption": "{images}", "vqa": "{images}{question}"},
            },
        },
        "data": {
            "train": str(shapes_dir / "train"),
            "tokenizer": str(shapes_dir / "tokenizer"),
            "shuffle_buffer": 16,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 3},
        "run": {"out": str(out), "max_steps": 20, "batch_size": 8, "save_every": 5, "keep_last": 3, **run},
    }
    return tree


def losses(run_dir):
    return [r["loss"] for r in read_log(run_dir / "log.jsonl")]


@pytest.mark.parametrize("packing", [{}, {"pack_turns": True, "pack_length": 256}], ids=["plain", "packed"])
def test_resume_continues_exactly(shapes_dir, tmp_path, monkeypatch, packing):
    """20 steps straight equal 10 steps, a crash, and a resumed 10 (per-step losses to 1e-6),
    also with packed rows (the packer is deterministic, so skipping batches finds the same ones)."""

    def recipe(out, **run):
        tree = tiny_recipe(shapes_dir, out, **run)
        tree["data"].update(packing)
        return recipe_from_dict(tree)

    straight = tmp_path / "straight"
    train(recipe(straight, grad_accum=2), progress=False)

    interrupted = tmp_path / "interrupted"
    real_save = checkpoint_module.save_checkpoint

    def crash_after_step_10(run_dir, step, **kwargs):
        path = real_save(run_dir, step, **kwargs)
        if step == 10:
            raise KeyboardInterrupt("simulated kill")
        return path

    monkeypatch.setattr("vlm.train.trainer.save_checkpoint", crash_after_step_10)
    with pytest.raises(KeyboardInterrupt):
        train(recipe(interrupted, grad_accum=2), progress=False)
    assert len(losses(interrupted)) == 10
    monkeypatch.setattr("vlm.train.trainer.save_checkpoint", real_save)
    summary = train(recipe(interrupted, grad_accum=2), resume=True, progress=False)

    assert summary["steps"] == 20
    expected, got = losses(straight), losses(interrupted)
    assert len(expected) == len(got) == 20
    assert max(abs(a - b) for a, b in zip(expected, got)) < 1e-6
    assert expected[-1] < expected[0]  # and it learns


def test_a_kill_during_a_checkpoint_write_keeps_the_last_good_one(shapes_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def dies_on_second_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as f:
                f.write(b"half a file")  # the process dies mid-write
            raise KeyboardInterrupt("killed during save")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(recipe_from_dict(tiny_recipe(shapes_dir, out)), progress=False)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)

    complete = checkpoints(out)
    assert [p.name for p in complete] == ["ckpt-00000005"]
    tokenizer = recipe_tokenizer(str(shapes_dir / "tokenizer"))
    model = build_training_model(recipe_from_dict(tiny_recipe(shapes_dir, out)), tokenizer)
    assert load_checkpoint(complete[0], model=model)["step"] == 5
    summary = train(recipe_from_dict(tiny_recipe(shapes_dir, out)), resume=True, progress=False)
    assert summary["steps"] == 20 and [p.name for p in checkpoints(out)][-1] == "ckpt-00000020"


def nan_on_calls(monkeypatch, calls):
    real_forward = VisionLanguageModel.forward
    count = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        count["n"] += 1
        if calls is None or count["n"] in calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(VisionLanguageModel, "forward", forward)


def test_a_nan_loss_is_skipped_and_counted(shapes_dir, tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, {3})
    out = tmp_path / "run"
    summary = train(recipe_from_dict(tiny_recipe(shapes_dir, out, max_steps=6)), progress=False)
    log = read_log(out / "log.jsonl")
    assert summary["skipped_steps"] == 1 and [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[1]["skipped_steps"] == 0 and log[2]["skipped_steps"] == 1
    assert all(r["loss"] == r["loss"] for r in log)  # no NaN reached the log or the weights


def test_nan_losses_in_a_row_stop_with_a_checkpoint(shapes_dir, tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, None)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite losses in a row"):
        train(recipe_from_dict(tiny_recipe(shapes_dir, out, max_bad_steps=3)), progress=False)
    assert [p.name for p in checkpoints(out)] == ["ckpt-00000000"]


def test_bad_recipe_keys_fail_fast_with_the_key(shapes_dir, tmp_path):
    base = tiny_recipe(shapes_dir, tmp_path)
    base["run"]["max_stepz"] = 3
    with pytest.raises(ConfigError, match="max_stepz"):
        recipe_from_dict(base)
    with pytest.raises(ConfigError, match="widht"):
        recipe_from_dict(tiny_recipe(shapes_dir, tmp_path), ["model.encoder.widht=3"])
    with pytest.raises(ConfigError, match="'optimizer'"):
        recipe_from_dict(tiny_recipe(shapes_dir, tmp_path), ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match="batch_size"):
        train(recipe_from_dict(tiny_recipe(shapes_dir, tmp_path, batch_size=7, grad_accum=2)), progress=False)


def test_overrides_are_parsed_as_toml(shapes_dir, tmp_path):
    recipe = recipe_from_dict(
        tiny_recipe(shapes_dir, tmp_path),
        ["optim.lr=5e-4", 'data.tasks=["vqa"]', "run.compile=true", "run.out=elsewhere"],
    )
    assert recipe.optim.lr == 5e-4 and recipe.data.tasks == ["vqa"] and recipe.run.compile is True
    assert recipe.run.out == "elsewhere"


def test_run_outputs(shapes_dir, tmp_path):
    out = tmp_path / "run"
    summary = train(recipe_from_dict(tiny_recipe(shapes_dir, out, max_steps=4)), progress=False)
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(
        {"loss", "lr", "samples_per_s", "fill"} <= set(r) for r in log
    )
    assert all(0 < r["fill"] <= 1 for r in log)
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tensorboard").iterdir())
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    from vlm import from_pretrained

    model = from_pretrained(summary["model"])  # a full export with its tokenizer
    assert (out / "model" / "tokenizer_config.json").is_file() and model.tokens_per_image == 16


@pytest.mark.parametrize("name", ["shapes", "shapes_highres"])
def test_shapes_recipes_load(name):
    recipe = load_recipe(f"train/recipes/{name}.toml")
    config = recipe.model_config()
    assert recipe.data.shapes and config.bridge.name == "linear" and config.processor.tiling.name == "split"


def test_training_from_the_feature_cache_matches_training_from_pixels(shapes_dir, tmp_path):
    """A frozen encoder's features, computed once, give the same losses as the pixels do."""

    def frozen(out, cache):
        tree = tiny_recipe(shapes_dir, out, max_steps=8, cache_features=cache)
        tree["model"]["encoder"]["freeze"] = True
        return recipe_from_dict(tree)

    train(frozen(tmp_path / "pixels", False), progress=False)
    train(frozen(tmp_path / "cached", True), progress=False)
    cache = tmp_path / "cached" / "feature-cache"
    assert sorted(p.name for p in cache.glob("*.tar")) == sorted(
        p.name for p in (shapes_dir / "train").glob("*.tar")
    )
    expected, got = losses(tmp_path / "pixels"), losses(tmp_path / "cached")
    assert len(got) == 8 and max(abs(a - b) for a, b in zip(expected, got)) < 1e-5


def test_the_feature_cache_needs_a_frozen_encoder(shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match="frozen encoder"):
        train(recipe_from_dict(tiny_recipe(shapes_dir, tmp_path, cache_features=True)), progress=False)


class RunsCode:
    """Unpickling this runs code: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("kind", ["crafted pickle", "damaged"])
def test_resume_refuses_an_unsafe_or_damaged_state_file(shapes_dir, tmp_path, kind):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    train(recipe_from_dict(tiny_recipe(shapes_dir, out, max_steps=5)), progress=False)
    state = checkpoints(out)[-1] / "state.pt"
    if kind == "damaged":
        state.write_bytes(state.read_bytes()[:100])
    else:
        real = torch.load(state, weights_only=True)  # what vlm wrote loads without pickle
        assert real["step"] == 5 and isinstance(real["rng"]["python"]["state"], torch.Tensor)
        torch.save({**real, "payload": RunsCode(marker)}, state)
    message = "refusing to load" if kind == "crafted pickle" else "is damaged"
    with pytest.raises(CheckpointError, match=message) as err:
        train(recipe_from_dict(tiny_recipe(shapes_dir, out, max_steps=8)), resume=True, progress=False)
    assert str(state) in str(err.value) and not marker.exists()


def shards_with_bad_samples(shapes_dir, out, bad_per_shard):
    """One shapes shard (16 good samples) and, per entry of ``bad_per_shard``, a shard of that
    many empty images."""
    out.mkdir()
    shutil.copy(sorted((shapes_dir / "train").glob("*.tar"))[0], out / "good.tar")
    for i, n in enumerate(bad_per_shard):
        text = json.dumps({"caption": "a red circle"}).encode()
        write_tar(out / f"bad-{i}.tar", [{"__key__": f"{j:04d}", "png": b"", "json": text} for j in range(n)])
    return out


@pytest.mark.parametrize("workers", [0, 1])  # raised in a DataLoader worker, the message is the same
def test_mostly_bad_data_stops_the_run_naming_the_worst_shards(shapes_dir, tmp_path, workers):
    data = shards_with_bad_samples(shapes_dir, tmp_path / "data", [16, 4])  # 20 bad, 16 good
    tree = tiny_recipe(shapes_dir, tmp_path / "run", max_steps=50)
    tree["data"].update(train=str(data), tasks=["caption"], num_workers=workers)
    with pytest.raises(TrainingError, match="worst shards") as err:
        train(recipe_from_dict(tree), progress=False)
    message = str(err.value)
    assert "20 of the 36 samples read are bad" in message and "max_bad_fraction=0.5" in message
    assert message.index("bad-0.tar (16 of 16 bad: empty 16)") < message.index("bad-1.tar")
    assert "good.tar" not in message and "Traceback" not in message


def test_a_few_bad_samples_still_train(shapes_dir, tmp_path):
    data = shards_with_bad_samples(shapes_dir, tmp_path / "data", [3])  # 3 bad of 19
    tree = tiny_recipe(shapes_dir, tmp_path / "run", max_steps=6)  # 3 epochs: each judged at its end
    tree["data"].update(train=str(data), tasks=["caption"])
    summary = train(recipe_from_dict(tree), progress=False)
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert summary["steps"] == 6 and log[-1]["epoch"] >= 2
    # the same data under a stricter limit stops
    tree["data"]["max_bad_fraction"] = 0.1
    tree["run"]["out"] = str(tmp_path / "strict")
    with pytest.raises(TrainingError, match=r"3 of the 19 samples read are bad \(16%"):
        train(recipe_from_dict(tree), progress=False)


@pytest.mark.parametrize("draft", [False, True])
def test_draft_decode_hands_the_encoders_size_to_the_decoder(shapes_dir, tmp_path, draft):
    from vlm.processor import Processor
    from vlm.train.distributed import Dist
    from vlm.train.trainer import make_train_loader

    recipe = recipe_from_dict(tiny_recipe(shapes_dir, tmp_path), [f"data.draft_decode={str(draft).lower()}"])
    tokenizer = recipe_tokenizer(recipe.data.tokenizer)
    model = build_training_model(recipe, tokenizer)
    processor = Processor(tokenizer, tokens_per_image=model.tokens_per_image, config=model.config.processor)
    loader = make_train_loader(recipe, model, processor, Dist(), 4, recipe.data.train)
    assert loader.dataset.samples.draft_size == (32 if draft else None)
    assert next(iter(loader))["pixel_values"].shape[1:] == (3, 32, 32)
