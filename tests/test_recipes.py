"""Every shipped recipe runs on the shapes shards once its model paths point at local weights."""

import json
from pathlib import Path

import open_clip
import pytest
import tiny
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vlm.train.recipe import load_recipe
from vlm.train.trainer import train

RECIPES = Path(__file__).parent.parent / "train" / "recipes"
TINY_BRIDGES = {
    "qformer": [
        "model.bridge.hidden_size=32",
        "model.bridge.num_layers=2",
        "model.bridge.num_heads=2",
        "model.bridge.intermediate_size=64",
        "model.bridge.num_queries=4",
    ],
    "perceiver": [
        "model.bridge.num_latents=4",
        "model.bridge.depth=1",
        "model.bridge.num_heads=2",
        "model.bridge.head_dim=16",
        "model.bridge.xattn_heads=2",
        "model.bridge.xattn_head_dim=16",
        "model.bridge.cross_attention_interval=2",
    ],
}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_clip):
    """Local 'pretrained' weights: a tiny CLIP checkpoint file and a tiny Llama directory."""
    root = tmp_path_factory.mktemp("base")
    torch.save(open_clip.create_model(tiny_clip).state_dict(), root / "clip.pt")
    config = AutoConfig.for_model(**tiny.DECODERS["llama"])
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "lm")
    return root


#: The shapes set's shards in the form each recipe reads: LLaVA's conversations come from the
#: LLaVA JSON files through the importer; Flamingo reads interleaved documents.
TRAIN = {"llava_stage1": "pretrain", "llava_stage2": "conversations/train", "flamingo": "documents/train"}


def overrides(name, base, shapes_dir, out, tiny_clip):
    settings = [
        f'model.encoder.model="{tiny_clip}"',
        f'model.encoder.checkpoint="{base / "clip.pt"}"',
        f'model.decoder.pretrained="{base / "lm"}"',
        'model.decoder.dtype="float32"',
        f'data.train="{shapes_dir / TRAIN.get(name, "train")}"',
        f'data.tokenizer="{shapes_dir / "tokenizer"}"',
        "data.num_workers=0",
        "model.processor.max_length=96",
        'model.processor.templates={caption = "{images}", vqa = "{images}{question}"}',
        f'run.out="{out}"',
        "run.max_steps=3",
        "run.batch_size=4",
        "run.grad_accum=2",
        "run.save_every=3",
    ]
    bridge = load_recipe(RECIPES / f"{name}.toml").model["bridge"]["name"]
    return settings + TINY_BRIDGES.get(bridge, [])


def run_recipe(name, base, shapes_dir, out, tiny_clip, monkeypatch, extra=()):
    captured = {}
    import vlm.train.trainer as trainer

    real_export = trainer.export

    def keep_model(model, tokenizer, path, **kwargs):
        captured["model"] = model
        return real_export(model, tokenizer, path, **kwargs)

    monkeypatch.setattr(trainer, "export", keep_model)
    recipe = load_recipe(
        RECIPES / f"{name}.toml", overrides(name, base, shapes_dir, out, tiny_clip) + list(extra)
    )
    summary = train(recipe, progress=False)
    return recipe, summary, captured["model"]


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ["llava_stage1", "blip2", "flamingo"])
def test_frozen_base_recipes_train_only_the_bridge(name, base, shapes_dir, tmp_path, tiny_clip, monkeypatch):
    from vlm import build_model
    from vlm.train.trainer import bind_tokenizer, recipe_tokenizer

    recipe, summary, model = run_recipe(name, base, shapes_dir, tmp_path / name, tiny_clip, monkeypatch)
    assert summary["steps"] == 3 and summary["final_loss"] == summary["final_loss"]
    torch.manual_seed(recipe.run.seed)
    fresh = build_model(bind_tokenizer(recipe.model_config(), recipe_tokenizer(recipe.data.tokenizer)))
    for part in ("encoder", "decoder"):
        before, after = state(getattr(fresh, part)), state(getattr(model, part))
        assert all(torch.equal(before[k], after[k]) for k in before), f"{part} changed"
    bridge_before, bridge_after = state(fresh.bridge), state(model.bridge)
    assert any(not torch.equal(bridge_before[k], bridge_after[k]) for k in bridge_before)
    saved = tmp_path / name / "model"
    assert (saved / "bridge.safetensors").is_file() and not (saved / "model.safetensors").exists()


def test_llava_stage2_starts_from_stage1_with_lora(base, shapes_dir, tmp_path, tiny_clip, monkeypatch):
    run_recipe("llava_stage1", base, shapes_dir, tmp_path / "stage1", tiny_clip, monkeypatch)
    stage1 = json.loads((tmp_path / "stage1" / "model" / "config.json").read_text())
    assert stage1["bridge"]["name"] == "mlp2x_gelu"
    from safetensors.torch import load_file

    trained_bridge = load_file(tmp_path / "stage1" / "model" / "bridge.safetensors")
    recipe, summary, model = run_recipe(
        "llava_stage2",
        base,
        shapes_dir,
        tmp_path / "stage2",
        tiny_clip,
        monkeypatch,
        extra=[
            f'run.init_from="{tmp_path / "stage1" / "model"}"',
            "model.decoder.lora.r=4",
            "model.decoder.lora.alpha=8",
        ],
    )
    assert summary["steps"] == 3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert all(n.startswith("bridge.") or "lora_" in n for n in trainable)
    log = [json.loads(line) for line in (tmp_path / "stage2" / "log.jsonl").read_text().splitlines()]
    stage1_log = [json.loads(line) for line in (tmp_path / "stage1" / "log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] != stage1_log[0]["loss"]  # it did not start from scratch
    assert set(trained_bridge) == {k.removeprefix("bridge.") for k in state(model) if k.startswith("bridge.")}
