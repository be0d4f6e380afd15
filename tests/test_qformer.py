"""Q-Former (BLIP-2) bridge: a fixed number of visual tokens per image, whatever the image size."""

import dataclasses

import pytest
import tiny
import torch

from vlm import ModelConfig, build_model

NUM_QUERIES = tiny.BRIDGES["qformer"].num_queries


def _qformer_model(image_size):
    config = tiny.model_config(tiny.vit_config(image_size=image_size, patch_size=8), "qformer", "gpt2")
    return build_model(config).eval()


@pytest.mark.parametrize(("image_size", "patches"), [(32, 16), (64, 64)])
def test_num_queries_whatever_the_encoder_size(image_size, patches):
    """ViTs of different input sizes give different token counts but the same num_queries tokens."""
    model = _qformer_model(image_size)
    pixels = torch.randn(3, 3, image_size, image_size)
    with torch.no_grad():
        features = model.encoder(pixels)
        visual = model.encode_images(pixels)
    assert features.shape == (3, patches, 32)
    assert model.encoder.num_tokens == patches
    assert visual.shape == (3, NUM_QUERIES, model.decoder.hidden_size)
    assert model.tokens_per_image == NUM_QUERIES


def test_larger_image_than_trained_size():
    """A 48x48 image on a 32x32 ViT interpolates positions (36 patches) and still gives num_queries."""
    model = _qformer_model(32)
    big = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert model.encoder(big).shape[1] == 36
        assert model.encoder(torch.randn(2, 3, 32, 32)).shape[1] == 16
        visual = model.encode_images(big)
    assert visual.shape == (2, NUM_QUERIES, model.decoder.hidden_size)
    assert torch.isfinite(visual).all()

    batch = tiny.make_batch(model, images_per_row=(1, 2), image_size=48)  # same placeholders as at 32
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("frequency", [1, 2, 3])
def test_cross_attention_frequency(frequency):
    """Layer i cross-attends to the image iff i % cross_attention_frequency == 0."""
    bridge = dataclasses.replace(tiny.BRIDGES["qformer"], num_layers=5, cross_attention_frequency=frequency)
    config = ModelConfig(encoder=tiny.vit_config(), bridge=bridge, decoder=tiny.model_config().decoder)
    model = build_model(config)
    layers = model.bridge.layers
    assert len(layers) == 5
    for i, layer in enumerate(layers):
        assert (layer.cross_attn is not None) == (i % frequency == 0), i
        assert (layer.cross_norm is not None) == (i % frequency == 0), i


def test_queries_depend_on_the_image():
    """Different images give different query outputs (the cross-attention is wired to the features)."""
    model = _qformer_model(32)
    with torch.no_grad():
        a = model.encode_images(torch.randn(1, 3, 32, 32))
        b = model.encode_images(torch.randn(1, 3, 32, 32))
    assert not torch.allclose(a, b, atol=1e-4)
