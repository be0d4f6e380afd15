"""SigLIP-shaped towers: transformers' SiglipVisionModel (and Idefics3's tower) loaded into vlm's
ViT and exported back, compared with transformers' own outputs; the ViT options saved and
reloaded; open_clip's SigLIP towers (timm trunks) as the ``clip`` encoder, against timm."""

import json
import logging

import open_clip
import pytest
import timm
import tiny
import torch
import transformers
from safetensors.torch import save_file
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

import vlm
from vlm import ConfigError, build_model
from vlm.convert.common import Checkpoint
from vlm.convert.towers import (
    SIGLIP_MEAN,
    load_siglip_tower,
    siglip_config,
    siglip_tower,
    siglip_tower_map,
    vit_tower,
)
from vlm.encoders import CLIPConfig, CLIPEncoder, ViTEncoder

TOWER = dict(
    num_hidden_layers=2,
    hidden_size=32,
    intermediate_size=80,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
ATOL = 1e-5


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random, norms and biases included (their init is ones and zeros, which
    would hide a norm or bias mapped to the wrong place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))


@pytest.fixture(scope="module")
def hf_siglip():
    """transformers' SigLIP tower, head included (the conversion drops it), random weights."""
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TOWER)).eval()
    _randomise(model)
    return model


def _converted(hf, **options) -> ViTEncoder:
    with torch.device("meta"):  # as converters build: the checkpoint's tensors become the parameters
        encoder = ViTEncoder(siglip_config(hf.config, **options))
    load_siglip_tower(encoder, hf.state_dict())
    return encoder.eval()


def _hf_states(hf, pixels, **kwargs):
    with torch.no_grad():
        return hf(pixel_values=pixels, output_hidden_states=True, **kwargs)


# --- transformers' SigLIP tower into vlm's ViT --------------------------------------------------


def test_siglip_config_shapes_the_vit(hf_siglip):
    config = siglip_config(hf_siglip.config)
    assert (config.class_token, config.pre_norm, config.patch_bias, config.act) == (
        False,
        False,
        True,
        "gelu_tanh",
    )
    assert (config.layer_norm_eps, config.feature_layer, config.final_norm) == (1e-6, -1, True)
    assert (config.mean, config.std) == (SIGLIP_MEAN, SIGLIP_MEAN)
    encoder = _converted(hf_siglip)
    assert encoder.class_token is None and "class_token" not in encoder.state_dict()
    assert encoder.pos_embed.shape == (16, 32)  # grid**2 positions, none for a class token
    assert encoder.num_tokens == 16 and encoder(PIXELS).shape == (2, 16, 32)


def test_last_hidden_state_matches_transformers(hf_siglip):
    """feature_layer=-1 with final_norm: the last layer after post_layernorm (Idefics3's features)."""
    ours = _converted(hf_siglip)(PIXELS)
    theirs = _hf_states(hf_siglip, PIXELS)
    torch.testing.assert_close(ours, theirs.last_hidden_state, atol=ATOL, rtol=0)
    assert not torch.allclose(ours, theirs.hidden_states[-1], atol=1e-2)  # the post-norm did act


@pytest.mark.parametrize("layer", [1, -2, -1])
def test_hidden_states_before_the_post_norm_match_transformers(hf_siglip, layer):
    """final_norm=False: hidden_states[layer] (-1: LLaVA-OneVision's, the last block un-normed)."""
    ours = _converted(hf_siglip, feature_layer=layer, final_norm=False)(PIXELS)
    torch.testing.assert_close(ours, _hf_states(hf_siglip, PIXELS).hidden_states[layer], atol=ATOL, rtol=0)


def test_other_resolution_interpolates_positions_as_transformers(hf_siglip):
    pixels = torch.randn(1, 3, 48, 40, generator=torch.Generator().manual_seed(6))
    ours = _converted(hf_siglip)(pixels)
    theirs = _hf_states(hf_siglip, pixels, interpolate_pos_encoding=True).last_hidden_state
    assert ours.shape == (1, 30, 32)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_idefics3_tower_loads_under_its_prefix():
    """Idefics3's tower has SigLIP's names under ``model.vision_model.``; the rest of a checkpoint
    (connector, text model) is left unused, for the converter to name."""
    vision = transformers.Idefics3VisionConfig(**TOWER)
    hf = transformers.models.idefics3.modeling_idefics3.Idefics3VisionTransformer(vision).eval()
    _randomise(hf, seed=1)
    weights = {f"model.vision_model.{k}": v for k, v in hf.state_dict().items()}
    weights["model.connector.modality_projection.proj.weight"] = torch.zeros(4, 4 * 32)
    checkpoint = Checkpoint(weights, source="idefics3")
    with torch.device("meta"):
        encoder = ViTEncoder(siglip_config(vision))
    load_siglip_tower(encoder, checkpoint, prefix="model.vision_model.")
    assert checkpoint.warn_unused() == ["model.connector.modality_projection.proj.weight"]
    with torch.no_grad():
        theirs = hf(pixel_values=PIXELS).last_hidden_state
        torch.testing.assert_close(encoder.eval()(PIXELS), theirs, atol=ATOL, rtol=0)


def test_the_head_is_left_unused(hf_siglip):
    checkpoint = Checkpoint({f"vision_model.{k}": v for k, v in hf_siglip.state_dict().items()}, "siglip")
    with torch.device("meta"):
        encoder = ViTEncoder(siglip_config(hf_siglip.config))
    load_siglip_tower(encoder, checkpoint, prefix="vision_model.")
    unused = checkpoint.warn_unused()
    assert unused and all(k.startswith("vision_model.head.") for k in unused)


def test_missing_tower_tensors_are_named_as_the_checkpoint_names_them(hf_siglip):
    state = {k: v for k, v in hf_siglip.state_dict().items() if "layers.1.self_attn.k_proj" not in k}
    with torch.device("meta"):
        encoder = ViTEncoder(siglip_config(hf_siglip.config))
    with pytest.raises(ConfigError, match=r"missing \['encoder\.layers\.1\.self_attn\.k_proj\.weight'"):
        load_siglip_tower(encoder, state)
    state = {k: v for k, v in hf_siglip.state_dict().items() if not k.startswith("post_layernorm")}
    with pytest.raises(ConfigError, match=r"missing \['post_layernorm\.weight', 'post_layernorm\.bias'\]"):
        load_siglip_tower(encoder, state)


def test_processor_normalisation_is_read(tmp_path, hf_siglip):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]})
    )
    config = siglip_config(hf_siglip.config, tmp_path)
    assert (config.mean, config.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert siglip_config(hf_siglip.config, tmp_path / "none").mean == SIGLIP_MEAN


@pytest.mark.parametrize(
    ("option", "named"),
    [({"hidden_act": "relu"}, "hidden_act='relu'"), ({"num_channels": 1}, "num_channels=1")],
)
def test_unrepresentable_siglip_configs_are_refused(option, named):
    with pytest.raises(ConfigError, match=f"SigLIP vision tower does not convert.*{named}"):
        siglip_config(transformers.SiglipVisionConfig(**(TOWER | option)))


# --- vlm's ViT back to transformers' SigLIP tower -----------------------------------------------


@pytest.mark.parametrize(("layer", "final_norm"), [(-1, True), (-1, False), (1, False)])
def test_export_to_transformers_siglip(layer, final_norm):
    encoder = ViTEncoder(
        siglip_config(transformers.SiglipVisionConfig(**TOWER), feature_layer=layer, final_norm=final_norm)
    ).eval()
    _randomise(encoder, seed=2)
    tower = siglip_tower(encoder)
    hf = transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**tower.config, vision_use_head=False)
    )
    hf.load_state_dict(tower.state)  # strict: every tensor has its place
    theirs = _hf_states(hf.eval(), PIXELS)
    expected = theirs.last_hidden_state if tower.post_norm else theirs.hidden_states[tower.feature_layer]
    assert (tower.feature_layer, tower.post_norm) == (layer - 3 if layer > 0 else layer, final_norm)
    with torch.no_grad():
        torch.testing.assert_close(encoder(PIXELS), expected, atol=ATOL, rtol=0)
    prefixed = siglip_tower(encoder, prefix="model.vision_model.").state
    assert sorted(prefixed) == sorted(f"model.vision_model.{k}" for k in tower.state)
    assert siglip_tower_map(2).to_vlm(tower.state).keys() == encoder.state_dict().keys()


def test_exports_refuse_what_the_other_tower_lacks():
    clip_shaped = ViTEncoder(tiny.vit_config())
    with pytest.raises(
        ConfigError, match="class_token=true, encoder.patch_bias=false, encoder.pre_norm=true"
    ):
        siglip_tower(clip_shaped)
    siglip_shaped = ViTEncoder(tiny.vit_config(class_token=False))
    with pytest.raises(ConfigError, match="CLIP vision tower: encoder.class_token=false"):
        vit_tower(siglip_shaped)
    normed_early = ViTEncoder(siglip_config(transformers.SiglipVisionConfig(**TOWER), feature_layer=1))
    with pytest.raises(ConfigError, match="final_norm=true at feature_layer=1"):
        siglip_tower(normed_early)


# --- the ViT options: errors, save and load, old configs ----------------------------------------


def test_keep_class_token_without_one_is_refused():
    with pytest.raises(ConfigError, match="keep_class_token=true needs a class token"):
        ViTEncoder(tiny.vit_config(class_token=False, keep_class_token=True))


def test_no_class_token_sincos_positions(tmp_path):
    encoder = ViTEncoder(tiny.vit_config(class_token=False, pos_init="sincos"))
    with_cls = ViTEncoder(tiny.vit_config(pos_init="sincos"))
    assert torch.equal(encoder.pos_embed, with_cls.pos_embed[1:])
    # A slice of the table would be a view that safetensors refuses to save.
    vit = tiny.vit_config(**SIGLIP_VIT, pos_init="sincos")
    model = build_model(tiny.model_config(vit, "linear", "llama"))
    model.save_pretrained(tmp_path)
    assert torch.equal(vlm.from_pretrained(tmp_path).encoder.pos_embed, encoder.pos_embed)


SIGLIP_VIT = dict(
    class_token=False,
    pre_norm=False,
    patch_bias=True,
    act="gelu_tanh",
    layer_norm_eps=1e-6,
    feature_layer=-1,
    final_norm=True,
)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_siglip_shaped_vit_round_trips(tmp_path):
    model = build_model(tiny.model_config(tiny.vit_config(**SIGLIP_VIT), "mlp2x_gelu", "llama"))
    batch = tiny.make_batch(model)
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["encoder"]
    assert {k: saved[k] for k in SIGLIP_VIT} == SIGLIP_VIT
    torch.manual_seed(7)  # another random init underneath the loaded weights
    loaded = vlm.from_pretrained(tmp_path)
    assert loaded.config.encoder == model.config.encoder
    assert loaded.encoder.class_token is None and loaded.encoder.num_tokens == 16
    assert torch.equal(_logits(loaded, batch), expected)


def test_old_style_vit_config_still_loads(tmp_path):
    """A config.json written before class_token existed loads as it did: a class token."""
    model = build_model(tiny.model_config("vit", "mlp2x_gelu", "gpt2"))
    batch = tiny.make_batch(model)
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    del data["encoder"]["class_token"]  # today's keys only
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = vlm.from_pretrained(tmp_path)
    assert loaded.config.encoder.class_token is True
    assert loaded.encoder.pos_embed.shape == (17, 32)
    assert torch.equal(_logits(loaded, batch), expected)


def test_old_vit_checkpoint_file_still_loads(tmp_path):
    """encoder.checkpoint files of a class-token ViT (today's) load into the default config."""
    source = ViTEncoder(tiny.vit_config()).eval()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    loaded = ViTEncoder(tiny.vit_config(checkpoint=str(path))).eval()
    with torch.no_grad():
        assert torch.equal(loaded(PIXELS), source(PIXELS))


# --- open_clip's SigLIP towers (timm trunks) as the clip encoder --------------------------------

TINY_SIGLIP_TRUNK = "vit_test_siglip_tiny"
TINY_OPEN_CLIP_SIGLIP = "test-Tiny-SigLIP"


def _tiny_siglip_trunk(pretrained=False, **kwargs):
    """timm's SigLIP ViT (no class token, attention pooling) at tiny sizes."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's loading options
        kwargs.pop(key, None)
    sizes = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=False)
    return VisionTransformer(**(sizes | {"global_pool": "map"} | kwargs))


@pytest.fixture(scope="module")
def open_clip_siglip(tmp_path_factory):
    """A 2-block open_clip SigLIP architecture: ViT-B-16-SigLIP's config with a tiny trunk."""
    if TINY_SIGLIP_TRUNK not in timm.list_models():
        _tiny_siglip_trunk.__name__ = TINY_SIGLIP_TRUNK
        register_model(_tiny_siglip_trunk)
    if TINY_OPEN_CLIP_SIGLIP not in open_clip.list_models():
        config = open_clip.get_model_config("ViT-B-16-SigLIP")
        config["embed_dim"] = 32
        config["vision_cfg"] |= {"image_size": 32, "timm_model_name": TINY_SIGLIP_TRUNK}
        config["text_cfg"] |= {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
        path = tmp_path_factory.mktemp("open_clip") / f"{TINY_OPEN_CLIP_SIGLIP}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
    return TINY_OPEN_CLIP_SIGLIP


def _open_clip_siglip(name, **overrides):
    return CLIPEncoder(CLIPConfig(model=name, **overrides)).eval()


def test_open_clip_siglip_last_layer_is_timms_features(open_clip_siglip):
    """feature_layer=-1 with final_norm: timm's forward_features (the trunk's tokens after its norm)."""
    encoder = _open_clip_siglip(open_clip_siglip, feature_layer=-1, final_norm=True)
    trunk = encoder.tower.trunk
    assert trunk.num_prefix_tokens == 0  # no class token to drop
    with torch.no_grad():
        ours, theirs = encoder(PIXELS), trunk.forward_features(PIXELS)
    assert encoder.num_tokens == 16 and encoder.feature_dim == 32
    assert torch.equal(ours, theirs)


def test_open_clip_siglip_penultimate_block(open_clip_siglip):
    encoder = _open_clip_siglip(open_clip_siglip)  # feature_layer=-2: the first of 2 blocks
    trunk = encoder.tower.trunk
    with torch.no_grad():
        expected = trunk.blocks[0](trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(PIXELS))))
        assert torch.equal(encoder(PIXELS), expected)
    trained = {n.split(".")[1] for n, p in encoder.tower.named_parameters() if p.requires_grad}
    assert trained == {"pos_embed", "patch_embed", "blocks"}  # the rest never runs
    assert not any(p.requires_grad for p in trunk.blocks[1].parameters())


def test_open_clip_siglip_refuses_a_class_token(open_clip_siglip):
    with pytest.raises(ConfigError, match="no class token to keep"):
        _open_clip_siglip(open_clip_siglip, keep_class_token=True)


def test_open_clip_siglip_normalisation(open_clip_siglip, caplog):
    """A local checkpoint gets open_clip's fallback normalisation; a warning names SigLIP's, and
    encoder.mean / encoder.std set it."""
    with caplog.at_level(logging.WARNING, logger="vlm.encoders.clip"):
        plain = _open_clip_siglip(open_clip_siglip)
    assert "set encoder.mean and encoder.std" not in caplog.text  # the tiny one has no pretrained tags
    set_ = _open_clip_siglip(open_clip_siglip, mean=SIGLIP_MEAN, std=SIGLIP_MEAN)
    assert (set_.mean, set_.std) == (SIGLIP_MEAN, SIGLIP_MEAN) != (plain.mean, plain.std)
    from vlm.encoders import clip

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlm.encoders.clip"):
        clip._warn_normalisation(open_clip, "ViT-B-16-SigLIP", (plain.mean, plain.std))
    assert "mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]" in caplog.text


def test_open_clip_siglip_in_a_model_round_trips(open_clip_siglip, tmp_path):
    encoder = CLIPConfig(model=open_clip_siglip, mean=SIGLIP_MEAN, std=SIGLIP_MEAN)
    model = build_model(tiny.model_config(encoder, "mlp2x_gelu", "gpt2"))
    batch = tiny.make_batch(model)
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)
    loaded = vlm.from_pretrained(tmp_path)
    assert loaded.config.encoder == encoder
    assert loaded.encoder.mean == SIGLIP_MEAN
    assert torch.equal(_logits(loaded, batch), expected)
