"""Published formats: transformers' LLaVA, BLIP-2 and IDEFICS checkpoints load into vlm's modules
and compute what transformers computes (tiny random models saved by the tests themselves)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    CLIPVisionConfig,
    IdeficsConfig,
    IdeficsForVisionText2Text,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    OPTConfig,
)

import vlm
from vlm.cli import main
from vlm.generate import generate

SIZE = 32  # image side
WIDE_INIT = 0.2  # larger random weights than the default 0.02, so images move the logits visibly


def _llava():
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=SIZE,
        patch_size=8,
        initializer_factor=10.0,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        initializer_range=WIDE_INIT,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=99, initializer_range=WIDE_INIT
    )
    return LlavaForConditionalGeneration(config), 99


def _blip2():
    config = Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=SIZE,
            patch_size=8,
            initializer_range=WIDE_INIT,
        ),
        qformer_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=32,
            vocab_size=100,
            initializer_range=WIDE_INIT,
        ),
        text_config=OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=100,
            word_embed_proj_dim=32,
            init_std=WIDE_INIT,
            eos_token_id=2,
        ).to_dict(),
        num_query_tokens=4,
        image_token_index=99,
        initializer_range=WIDE_INIT,
    )
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # transformers starts the queries at zero: make them distinct
        model.query_tokens.normal_(0, 1)
    return model, 99


def _idefics(tokenizer):
    config = IdeficsConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        cross_layer_interval=2,
        use_resampler=True,
        initializer_range=WIDE_INIT,
        alpha_initializer="ones",  # open gates: the images reach the text
        vision_config=dict(
            embed_dim=32,
            image_size=SIZE,
            patch_size=8,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        perceiver_config=dict(
            resampler_n_latents=4, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8
        ),
    )
    return IdeficsForVisionText2Text(config), tokenizer.convert_tokens_to_ids("<image>")


FORMATS = ["llava", "blip2", "idefics"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each format saved by transformers: ``name -> (directory, transformers model, image token id)``."""
    from data.shapes import tokenizer as shapes_tokenizer

    torch.manual_seed(0)
    out = {}
    for name in FORMATS:
        path = tmp_path_factory.mktemp(name)
        if name == "idefics":
            tokenizer = shapes_tokenizer()  # IDEFICS names its <image> token in the tokenizer
            model, image_id = _idefics(tokenizer)
            tokenizer.save_pretrained(path)
        else:
            model, image_id = _llava() if name == "llava" else _blip2()
        model.save_pretrained(path)
        out[name] = (path, model.eval(), image_id)
    return out


def _inputs(name: str, model, image_id: int, tokens_per_image: int, rows: int = 2):
    """The same text and images in transformers' layout and in vlm's."""
    g = torch.Generator().manual_seed(1)
    if name == "idefics":  # two images per row, <image> tokens and the mask of the latest image
        ids = torch.tensor([[1, 7, image_id, 8, 9, image_id, 10, 11, 12]] * rows)
        pixels = torch.randn(rows, 2, 3, SIZE, SIZE, generator=g)
        latest = (ids == image_id).long().cumsum(1)
        mask = torch.nn.functional.one_hot(latest, 3)[..., 1:]
        hf = dict(
            input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), image_attention_mask=mask
        )
        ours = dict(input_ids=ids, pixel_values=pixels.flatten(0, 1), attention_mask=torch.ones_like(ids))
        return hf, ours
    text = torch.randint(3, 90, (rows, 6), generator=g)
    ids = torch.cat([text[:, :2], torch.full((rows, tokens_per_image), image_id), text[:, 2:]], dim=1)
    pixels = torch.randn(rows, 3, SIZE, SIZE, generator=g)
    hf = dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))
    return hf, dict(hf)


@pytest.mark.parametrize("name", FORMATS)
def test_converted_logits_equal_transformers(checkpoints, name):
    path, hf_model, image_id = checkpoints[name]
    model = vlm.from_pretrained(path).eval()
    hf_inputs, inputs = _inputs(name, hf_model, image_id, model.tokens_per_image)
    with torch.no_grad():
        expected = hf_model(**hf_inputs).logits
        got = model(**inputs).logits
        # Called exactly like the transformers model, too (IDEFICS: 5-D pixels plus the mask).
        got_hf_style = model(**hf_inputs).logits
        other_images = {**hf_inputs, "pixel_values": torch.randn_like(hf_inputs["pixel_values"])}
        moved = (hf_model(**other_images).logits - expected).abs().max()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_hf_style, expected, atol=1e-4, rtol=0)
    assert moved > 1e-2, "the images barely move the logits: the comparison would not test the image path"


@pytest.mark.parametrize("name", FORMATS)
def test_converted_greedy_generation_equals_transformers(checkpoints, name):
    path, hf_model, image_id = checkpoints[name]
    model = vlm.from_pretrained(path).eval()
    hf_inputs, inputs = _inputs(name, hf_model, image_id, model.tokens_per_image, rows=1)
    prompt = hf_inputs["input_ids"].shape[1]
    with torch.no_grad():  # vlm never generates the <image> token: ask transformers for the same
        expected = hf_model.generate(
            **hf_inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False, suppress_tokens=[image_id]
        )[:, prompt:]
    got = generate(
        model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], max_new_tokens=16
    )
    assert expected.shape == (1, 16)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("name", FORMATS)
def test_converted_model_saves_and_reloads_in_vlm_format(checkpoints, name, tmp_path):
    path, hf_model, image_id = checkpoints[name]
    converted = vlm.from_pretrained(path).eval()
    assert main(["save", "--model", str(path), "--out", str(tmp_path / "vlm")]) == 0
    config = json.loads((tmp_path / "vlm" / "config.json").read_text())
    assert {"encoder", "bridge", "decoder"} <= config.keys()  # vlm's own format now
    reloaded = vlm.from_pretrained(tmp_path / "vlm").eval()
    _, inputs = _inputs(name, hf_model, image_id, converted.tokens_per_image)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, converted(**inputs).logits, atol=0, rtol=0)
    if name == "idefics":
        assert (tmp_path / "vlm" / "tokenizer_config.json").is_file()


def test_unsupported_architecture_names_the_supported_formats(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(vlm.ConfigError) as err:
        vlm.from_pretrained(tmp_path)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    for supported in (
        "LlavaForConditionalGeneration",
        "Blip2ForConditionalGeneration",
        "IdeficsForVisionText2Text",
    ):
        assert supported in message


def test_unsupported_variant_is_refused_by_name(tmp_path):
    model, _ = _llava()
    model.config.vision_feature_layer = [-2, -1]
    model.save_pretrained(tmp_path)
    with pytest.raises(vlm.ConfigError, match="vision_feature_layer"):
        vlm.from_pretrained(tmp_path)
