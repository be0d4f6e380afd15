"""save_pretrained / from_pretrained: full and bridge-only checkpoints reload the same model."""

import json

import pytest
import tiny
import torch

import vlm
from vlm import ConfigError, build_model, from_pretrained


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits


def _train_bridge(model, steps=3):
    """Simulated training: a few AdamW steps on the bridge."""
    model.train()
    opt = torch.optim.AdamW(model.bridge.parameters(), lr=1e-2)
    for seed in range(steps):
        opt.zero_grad()
        model(**tiny.make_batch(model, seed=seed)).loss.backward()
        opt.step()


@pytest.mark.parametrize("decoder", ["gpt2", "llama"])  # gpt2 ties lm_head to the embeddings, llama not
@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_full_round_trip(bridge, decoder, tmp_path):
    """A full checkpoint reloads to bit-identical logits, from its own directory only."""
    model = build_model(tiny.model_config("vit", bridge, decoder))
    tiny.open_gates(model, 0.5)  # cross-attention bridges: so their weights matter
    batch = tiny.make_batch(model)
    expected = _logits(model, batch)

    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["decoder"]["pretrained"] is None
    assert saved["decoder"]["hf_config"]["model_type"] == decoder
    assert saved["image_token_id"] == model.image_token_id

    torch.manual_seed(123)  # a different random init underneath the loaded weights
    loaded = from_pretrained(tmp_path)
    assert isinstance(loaded, vlm.VisionLanguageModel)
    assert loaded.image_token_id == model.image_token_id
    assert loaded.decoder.lm.get_input_embeddings().num_embeddings == tiny.VOCAB + 1
    assert torch.equal(_logits(loaded, batch), expected)

    tied = loaded.decoder.lm.get_output_embeddings().weight is loaded.decoder.lm.get_input_embeddings().weight
    assert tied == (decoder == "gpt2")


def test_full_round_trip_clip_encoder(tmp_path):
    """The open_clip tower's weights travel in model.safetensors too."""
    model = build_model(tiny.model_config("clip", "qformer", "llama"))
    batch = tiny.make_batch(model)
    expected = _logits(model, batch)
    vlm.save_pretrained(model, tmp_path)
    torch.manual_seed(7)
    loaded = vlm.from_pretrained(tmp_path)
    assert torch.equal(_logits(loaded, batch), expected)


def test_full_round_trip_keeps_a_trained_model(tmp_path):
    """A model trained with an unfrozen encoder and LoRA reloads with all of that training."""
    config = tiny.model_config(
        "vit", "mlp2x_gelu", "llama", lora=vlm.LoraSettings(r=4, target_modules=["q_proj", "v_proj"])
    )
    config.encoder.freeze = False
    model = build_model(config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**tiny.make_batch(model)).loss.backward()
    opt.step()
    batch = tiny.make_batch(model, seed=5)
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(from_pretrained(tmp_path), batch), expected)


@pytest.fixture
def base_files(tmp_path):
    """A saved tiny GPT-2 directory and ViT checkpoint to rebuild a frozen base from."""
    return tiny.save_frozen_base(tmp_path / "base", decoder="gpt2")


@pytest.mark.parametrize("decoder", ["gpt2", "llama"])
@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_bridge_only_round_trip(bridge, decoder, tmp_path):
    """A bridge-only checkpoint is small and, loaded onto the rebuilt base, gives the trained logits."""
    base_files = tiny.save_frozen_base(tmp_path / "base", decoder=decoder)
    config = tiny.based_config(*base_files, bridge=bridge)
    model = build_model(config)
    batch = tiny.make_batch(model, seed=9)
    untrained = _logits(model, batch)
    _train_bridge(model)
    trained = _logits(model, batch)
    assert not torch.equal(trained, untrained)

    out = tmp_path / "ckpt"
    model.save_pretrained(out, bridge_only=True)
    assert (out / "bridge.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert (out / "bridge.safetensors").stat().st_size < 1_000_000
    assert json.loads((out / "config.json").read_text())["decoder"]["pretrained"] == base_files[0]

    torch.manual_seed(99)
    loaded = from_pretrained(out)
    assert torch.equal(_logits(loaded, batch), trained)

    torch.manual_seed(99)
    fresh = build_model(config)  # same base, untrained bridge
    assert not torch.allclose(_logits(fresh, batch), trained)


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")
@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("random_encoder", "encoder.checkpoint is not set"),
        ("trainable_encoder", "the encoder is trainable"),
        ("trainable_decoder", "the decoder is trainable"),
        ("lora", "LoRA"),
        ("random_decoder", "decoder.pretrained is not set"),
    ],
)
def test_bridge_only_refuses_unrebuildable_base(change, problem, base_files, tmp_path):
    """bridge_only=True on a base that cannot be rebuilt from files says to save the full model."""
    config = tiny.based_config(*base_files)
    if change == "random_encoder":
        config.encoder.checkpoint = None
    elif change == "trainable_encoder":
        config.encoder.freeze = False
    elif change == "trainable_decoder":
        config.decoder.freeze = False
    elif change == "lora":
        config.decoder.lora = vlm.LoraSettings(r=2, target_modules=["c_attn"])
    else:
        config = tiny.model_config(tiny.vit_config(checkpoint=base_files[1]), "linear", "gpt2")
    model = build_model(config)
    with pytest.raises(ConfigError, match=r"(?i)save the full model") as err:
        model.save_pretrained(tmp_path / "ckpt", bridge_only=True)
    assert problem in str(err.value)
    assert not (tmp_path / "ckpt" / "bridge.safetensors").exists()


def test_from_pretrained_without_config(tmp_path):
    """An empty directory is not a model: the error says how to write one."""
    with pytest.raises(ConfigError, match="save_pretrained"):
        from_pretrained(tmp_path)


def test_from_pretrained_without_weights(tmp_path):
    """A config.json with no weights next to it names the missing files and save_pretrained."""
    model = build_model(tiny.model_config("vit", "linear", "gpt2"))
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="save_pretrained") as err:
        from_pretrained(tmp_path)
    assert "model.safetensors" in str(err.value) and "bridge.safetensors" in str(err.value)
