"""Image encoders: the hidden state feature_layer selects, class token, token counts, checkpoints."""

import open_clip
import pytest
import tiny
import torch
from safetensors.torch import save_file

from vlm import ConfigError
from vlm.encoders import CLIPConfig, CLIPEncoder, ViTEncoder
from vlm.encoders.base import CLIP_MEAN, CLIP_STD

PIXELS = torch.randn(2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, generator=torch.Generator().manual_seed(3))


def _vit(**overrides):
    return ViTEncoder(tiny.vit_config(**overrides)).eval()


def _vit_hidden_states(vit, pixels):
    """transformers-style hidden_states of the ViT, computed by hand: [embeddings, block 1, block 2]."""
    x = vit.patch_embed(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([vit.class_token.expand(x.shape[0], 1, -1), x], dim=1) + vit.pos_embed
    states = [vit.norm_pre(x)]
    for block in vit.blocks:
        states.append(block(states[-1]))
    return states


# --- ViT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "index"), [(-2, 1), (1, 1), (-1, 2), (2, 2), (0, 0), (-3, 0)])
def test_vit_feature_layer_selects_hidden_state(layer, index):
    """feature_layer indexes hidden states like transformers (-2 = penultimate block); cls dropped."""
    vit = _vit(feature_layer=layer)
    with torch.no_grad():
        expected = _vit_hidden_states(vit, PIXELS)[index][:, 1:]
        out = vit(PIXELS)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_vit_negative_and_positive_layers_agree():
    """On a 2-block ViT, feature_layer=-2 and feature_layer=1 are the same output (same weights)."""
    a = _vit(feature_layer=-2)
    b = _vit(feature_layer=1)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(a(PIXELS), b(PIXELS))
        c = _vit(feature_layer=-1)
        c.load_state_dict(a.state_dict())
        assert not torch.allclose(c(PIXELS), a(PIXELS))


def test_vit_class_token_and_num_tokens():
    """keep_class_token prepends the class token; num_tokens always matches the output."""
    plain = _vit()
    with_cls = _vit(keep_class_token=True)
    with_cls.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = plain(PIXELS), with_cls(PIXELS)
        hidden = _vit_hidden_states(plain, PIXELS)[1]
    assert a.shape == (2, 16, 32) and plain.num_tokens == 16
    assert b.shape == (2, 17, 32) and with_cls.num_tokens == 17
    assert torch.equal(b[:, 1:], a)
    torch.testing.assert_close(b[:, 0], hidden[:, 0], atol=1e-6, rtol=1e-6)
    assert plain.feature_dim == 32 and plain.image_size == tiny.IMAGE_SIZE
    assert (plain.mean, plain.std) == (CLIP_MEAN, CLIP_STD)


def test_vit_final_norm():
    """final_norm=True applies the final LayerNorm to the selected hidden state."""
    plain = _vit()
    normed = _vit(final_norm=True)
    normed.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(normed(PIXELS), plain.norm(plain(PIXELS)), atol=1e-6, rtol=1e-6)


def test_vit_checkpoint_loads(tmp_path):
    """encoder.checkpoint (.safetensors) restores exactly the saved weights."""
    source = _vit()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    loaded = _vit(checkpoint=str(path))
    fresh = _vit()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not torch.equal(fresh.pos_embed, source.pos_embed)


# --- CLIP (open_clip) --------------------------------------------------------------------------


def _clip(**overrides):
    return CLIPEncoder(CLIPConfig(model=tiny.TINY_CLIP, **overrides)).eval()


def test_clip_last_layer_matches_open_clip():
    """feature_layer=-1 is open_clip's own last-block intermediate (patch tokens, NLC)."""
    enc = _clip(feature_layer=-1)
    with torch.no_grad():
        ours = enc(PIXELS)
        theirs = enc.tower.forward_intermediates(
            PIXELS, indices=[1], intermediates_only=True, output_fmt="NLC"
        )
    assert ours.shape == (2, 16, 64)
    assert torch.equal(ours, theirs["image_intermediates"][0])


def test_clip_penultimate_differs_from_last():
    enc = _clip(feature_layer=-2)
    with torch.no_grad():
        theirs = enc.tower.forward_intermediates(
            PIXELS, indices=[0, 1], intermediates_only=True, output_fmt="NLC"
        )
        ours = enc(PIXELS)
    assert torch.equal(ours, theirs["image_intermediates"][0])
    assert not torch.allclose(ours, theirs["image_intermediates"][1])


def test_clip_class_token_gives_the_image_embedding():
    """keep_class_token adds one token; with final_norm at the last layer it is CLIP's pooled token."""
    plain = _clip(feature_layer=-1)
    full = _clip(feature_layer=-1, keep_class_token=True, final_norm=True)
    full.tower.load_state_dict(plain.tower.state_dict())
    with torch.no_grad():
        a, b = plain(PIXELS), full(PIXELS)
        embedding = full.tower(PIXELS)  # ln_post(class token) @ proj
    assert (plain.num_tokens, full.num_tokens) == (16, 17)
    assert b.shape == (2, 17, 64)
    torch.testing.assert_close(b[:, 0] @ full.tower.proj, embedding, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[:, 1:], full.tower.ln_post(a), atol=1e-5, rtol=1e-5)


def test_clip_checkpoint_loads(tmp_path):
    """encoder.checkpoint loads a local open_clip checkpoint into the vision tower."""
    clip = open_clip.create_model(tiny.TINY_CLIP)
    path = tmp_path / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)
    visual = {k.removeprefix("visual."): v for k, v in clip.state_dict().items() if k.startswith("visual.")}

    loaded = _clip(checkpoint=str(path))
    fresh = _clip()
    state = loaded.tower.state_dict()
    assert state.keys() == visual.keys()
    assert all(torch.equal(state[k], visual[k]) for k in visual)
    assert not torch.equal(fresh.tower.conv1.weight, visual["conv1.weight"])


def test_clip_named_vit_architecture():
    """A real architecture by name (random init): ViT-B-32 penultimate features, 7x7 patches."""
    enc = CLIPEncoder(CLIPConfig(model="ViT-B-32", feature_layer=-2))
    assert (enc.feature_dim, enc.num_tokens, enc.image_size) == (768, 49, 224)
    assert (enc.mean, enc.std) == (CLIP_MEAN, CLIP_STD)
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 49, 768)


def test_clip_resnet_tower():
    """A non-ViT tower (RN50) gives (B, tokens, channels) from its feature map."""
    enc = CLIPEncoder(CLIPConfig(model="RN50", image_size=64)).eval()
    assert not enc.is_vit
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = enc(pixels)
        stages = enc.tower.forward_intermediates(pixels, intermediates_only=True)["image_intermediates"]
    feature_map = stages[-2]  # penultimate stage (feature_layer=-2), (B, C, H, W)
    channels, h, w = feature_map.shape[1:]
    assert out.shape == (2, h * w, channels)
    assert (enc.num_tokens, enc.feature_dim) == (h * w, channels)
    torch.testing.assert_close(out, feature_map.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("patch_size", [4, 8])
def test_vit_conv_stem_gives_the_patch_grid(patch_size):
    """The convolutional stem ends on the same patch grid as the strided patch embedding."""
    pixels = torch.randn(2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    conv = ViTEncoder(tiny.vit_config(patch_size=patch_size, stem="conv"))
    patch = ViTEncoder(tiny.vit_config(patch_size=patch_size))
    assert conv(pixels).shape == patch(pixels).shape == (2, (tiny.IMAGE_SIZE // patch_size) ** 2, 32)
    assert isinstance(conv.patch_embed, torch.nn.Sequential)


def test_vit_options_for_published_towers():
    """quick_gelu (OpenAI CLIP), no pre-norm and a patch bias (BLIP-2's EVA ViT) change the model."""
    pixels = torch.randn(1, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    torch.manual_seed(0)
    base = ViTEncoder(tiny.vit_config())
    for option in ({"act": "quick_gelu"}, {"pre_norm": False}):
        torch.manual_seed(0)
        other = ViTEncoder(tiny.vit_config(**option))
        other.load_state_dict(base.state_dict(), strict=False)  # same weights, one option changed
        with torch.no_grad():
            assert not torch.allclose(other(pixels), base(pixels)), option
    assert ViTEncoder(tiny.vit_config(patch_bias=True)).patch_embed.bias is not None


@pytest.mark.parametrize(
    "option", [{"act": "swish"}, {"stem": "conv", "patch_size": 12, "image_size": 36}, {"stem": "deep"}]
)
def test_vit_bad_options_name_the_fix(option):
    with pytest.raises(ConfigError, match="encoder"):
        ViTEncoder(tiny.vit_config(**option))


def test_vit_sincos_positions_tell_rows_and_columns_apart():
    from vlm.encoders.vit import sincos_2d

    table = sincos_2d(grid=4, width=32)
    assert table.shape == (17, 32) and torch.equal(table[0], torch.zeros(32))
    patches = table[1:].reshape(4, 4, 32)
    assert torch.equal(patches[0, :, :16], patches[0, :1, :16].expand(4, -1))  # a row shares its row half
    assert torch.equal(patches[:, 0, 16:], patches[:1, 0, 16:].expand(4, -1))  # a column its column half
    assert len({tuple(p.tolist()) for p in table[1:]}) == 16  # every patch position is distinct
    encoder = ViTEncoder(tiny.vit_config(pos_init="sincos"))
    torch.testing.assert_close(encoder.pos_embed.data, sincos_2d(4, 32))
    with pytest.raises(ConfigError, match="pos_init"):
        ViTEncoder(tiny.vit_config(pos_init="rope"))
