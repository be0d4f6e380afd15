"""Bad configurations fail with one vlm.ConfigError whose message names the fix; configs round-trip."""

import dataclasses
import json

import pytest
import tiny
import torch

from vlm import (
    CLIPConfig,
    ConfigError,
    HFDecoderConfig,
    LoraSettings,
    ModelConfig,
    build_model,
    from_pretrained,
)


def _dict_config(**parts):
    """The dict form of a tiny vit / linear / gpt2 model, with some parts replaced."""
    data = tiny.model_config("vit", "linear", "gpt2").to_dict()
    data.update(parts)
    return data


def _build_with(encoder=None, bridge=None, decoder=None):
    base = tiny.model_config("vit", "linear", "gpt2")
    return build_model(
        ModelConfig(
            encoder=encoder or base.encoder, bridge=bridge or base.bridge, decoder=decoder or base.decoder
        )
    )


# --- names and keys ----------------------------------------------------------------------------


def test_unknown_encoder_name_lists_registered():
    with pytest.raises(ConfigError, match="unknown encoder 'nope'") as err:
        build_model(_dict_config(encoder={"name": "nope"}))
    assert "registered encoders: clip, vit" in str(err.value)
    assert "encoder.name" in str(err.value)


def test_unknown_bridge_name_lists_registered():
    with pytest.raises(ConfigError, match="unknown bridge 'resampler'") as err:
        build_model(_dict_config(bridge={"name": "resampler"}))
    assert "linear, mlp2x_gelu, perceiver, qformer" in str(err.value)


def test_unknown_name_in_dataclass_config():
    """A dataclass config with a bad name gets the same message as the dict form."""
    with pytest.raises(ConfigError, match="registered encoders: clip, vit"):
        _build_with(encoder=dataclasses.replace(tiny.vit_config(), name="nope"))


def test_part_config_without_name():
    with pytest.raises(ConfigError, match="registered bridges"):
        build_model(_dict_config(bridge={"hidden_size": 32}))


@pytest.mark.parametrize(
    ("part", "value"),
    [
        ("encoder", {"name": "vit", "widht": 32}),
        ("bridge", {"name": "qformer", "num_querys": 4}),
        ("decoder", {"name": "hf", "hf_config": tiny.DECODERS["gpt2"], "lora": {"rank": 4}}),
    ],
)
def test_unknown_key_is_named(part, value):
    """A typo in a part's keys names the key and the keys that exist."""
    typo = next(k for k in ("widht", "num_querys", "rank") if k in json.dumps(value))
    with pytest.raises(ConfigError, match=f"unknown key\\(s\\) '{typo}'") as err:
        build_model(_dict_config(**{part: value}))
    assert "known keys are" in str(err.value)


def test_unknown_top_level_key_and_missing_part():
    with pytest.raises(ConfigError, match="'encoders'"):
        build_model(_dict_config(encoders={}))
    data = _dict_config()
    del data["decoder"]
    with pytest.raises(ConfigError, match="lacks decoder"):
        build_model(data)


# --- values ------------------------------------------------------------------------------------


def test_vit_width_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"encoder.width=30 is not divisible by encoder.num_heads=4"):
        _build_with(encoder=tiny.vit_config(width=30, num_heads=4))


def test_vit_image_size_not_multiple_of_patch():
    with pytest.raises(ConfigError, match=r"encoder.image_size=30 is not a multiple of encoder.patch_size=8"):
        _build_with(encoder=tiny.vit_config(image_size=30))


@pytest.mark.parametrize("layer", [3, -4, 10])
def test_vit_feature_layer_out_of_range(layer):
    """Depth 2 has hidden states -3..2; the message gives the valid range."""
    with pytest.raises(ConfigError, match=rf"feature_layer={layer} is outside a 2-block encoder") as err:
        _build_with(encoder=tiny.vit_config(feature_layer=layer))
    assert "[-3, 2]" in str(err.value)


@pytest.mark.parametrize("layer", [3, -4, 0])
def test_clip_feature_layer_out_of_range(layer):
    with pytest.raises(ConfigError, match="feature_layer"):
        _build_with(encoder=CLIPConfig(model=tiny.TINY_CLIP, feature_layer=layer))


def test_clip_unknown_model_suggests_names():
    with pytest.raises(ConfigError, match="not an open_clip architecture") as err:
        _build_with(encoder=CLIPConfig(model="ViT-B-3"))
    assert "open_clip.list_models()" in str(err.value)
    assert "Did you mean" in str(err.value) and "ViT-B-32" in str(err.value)


def test_clip_checkpoint_missing(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="encoder.checkpoint .* does not exist") as err:
        _build_with(encoder=CLIPConfig(model=tiny.TINY_CLIP, checkpoint=missing))
    assert missing in str(err.value)


def test_vit_checkpoint_missing(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(ConfigError, match="encoder.checkpoint .* does not exist") as err:
        _build_with(encoder=tiny.vit_config(checkpoint=missing))
    assert "null for random initialisation" in str(err.value)


def test_decoder_pretrained_missing(tmp_path):
    with pytest.raises(ConfigError, match="decoder.pretrained=.* is not a local transformers model"):
        _build_with(decoder=HFDecoderConfig(pretrained=str(tmp_path / "no-lm")))


@pytest.mark.parametrize("hf_config", [None, {}, {"n_layer": 2}])
def test_decoder_needs_pretrained_or_hf_config(hf_config):
    with pytest.raises(ConfigError, match="decoder.pretrained .* or decoder.hf_config") as err:
        _build_with(decoder=HFDecoderConfig(hf_config=hf_config))
    assert "model_type" in str(err.value)


def test_decoder_unknown_model_type():
    with pytest.raises(ConfigError, match="decoder.hf_config cannot build a causal LM"):
        _build_with(decoder=HFDecoderConfig(hf_config={"model_type": "not-a-model"}))


def test_qformer_hidden_not_divisible_by_heads():
    bridge = dataclasses.replace(tiny.BRIDGES["qformer"], hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError, match="bridge.hidden_size=30 is not divisible by bridge.num_heads=4"):
        _build_with(bridge=bridge)


@pytest.mark.parametrize(
    ("bridge", "change", "message"),
    [
        ("perceiver", {"placement": "middle"}, "placement 'first' or 'last'"),
        ("perceiver", {"cross_attention_interval": 0}, "cross_attention_interval must be >= 1"),
        ("perceiver", {"mlp_act": "swish"}, "mlp_act must be one of"),
        ("qformer", {"cross_attention_frequency": 0}, "cross_attention_frequency must be >= 1"),
    ],
)
def test_bad_bridge_settings(bridge, change, message):
    with pytest.raises(ConfigError, match=message):
        _build_with(bridge=dataclasses.replace(tiny.BRIDGES[bridge], **change))


@pytest.mark.parametrize(
    ("bridge", "edit"), [("qformer", {"hidden_size": 64}), ("perceiver", {"num_latents": 8})]
)
def test_bridge_weights_of_another_size(bridge, edit, tmp_path):
    """Editing the bridge size in a bridge-only checkpoint's config.json is caught on load."""
    model = build_model(tiny.based_config(*tiny.save_frozen_base(tmp_path / "base"), bridge=bridge))
    out = tmp_path / "ckpt"
    model.save_pretrained(out, bridge_only=True)
    data = json.loads((out / "config.json").read_text())
    data["bridge"].update(edit)
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="do not fit the model its config.json describes") as err:
        from_pretrained(out)
    assert "config" in str(err.value) and "bridge.safetensors" in str(err.value)


# --- round trips -------------------------------------------------------------------------------


def _configs():
    for bridge in tiny.BRIDGES:
        yield pytest.param(tiny.model_config("vit", bridge, "llama"), id=f"vit-{bridge}")
    lora = LoraSettings(r=4, target_modules=["q_proj", "v_proj"])
    yield pytest.param(
        dataclasses.replace(
            tiny.model_config(
                CLIPConfig(model=tiny.TINY_CLIP, keep_class_token=True),
                "qformer",
                "llama",
                lora=lora,
                dtype="float32",
            ),
            image_token_id=2,
            extra={"note": "run 7"},
        ),
        id="clip-lora-extra",
    )


@pytest.mark.parametrize("config", _configs())
def test_config_json_round_trip(config):
    """to_dict -> JSON -> from_dict gives an equal ModelConfig (tuples, nested dataclasses included)."""
    data = json.loads(json.dumps(config.to_dict()))
    restored = ModelConfig.from_dict(data)
    assert restored == config  # a list where a tuple belongs, or a dict for LoraSettings, would differ
    assert type(restored.bridge) is type(config.bridge)


@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_build_model_accepts_dict(bridge):
    """build_model(dict) builds the same model as build_model(ModelConfig)."""
    config = tiny.model_config("vit", bridge, "gpt2")
    torch.manual_seed(0)
    from_dataclass = build_model(config)
    torch.manual_seed(0)
    from_dict = build_model(json.loads(json.dumps(config.to_dict())))
    assert from_dict.config == config
    a, b = from_dataclass.state_dict(), from_dict.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
