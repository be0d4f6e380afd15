"""Published formats: transformers' LLaVA, BLIP-2 and IDEFICS checkpoints load into vlm's modules
and compute what transformers computes (tiny random models saved by the tests themselves). The
shared tests run over every registered format (``vlm.convert.FORMATS``), two images per row."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

import vlm
from vlm.cli import main
from vlm.convert import CONVERTERS, FORMATS, IMAGE_TOKEN_ID, register_format, supported
from vlm.convert.registry import probe_images
from vlm.eval import bench
from vlm.eval.bench_convert import measure, write_checkpoint
from vlm.generate import generate

TINY = bench.SIZES["tiny"]  # random weights wide enough that images move the logits visibly
SIZE = TINY.image
IMAGE_ID = IMAGE_TOKEN_ID  # "<image>" in the placeholder tokenizer
NAMES = list(FORMATS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each format saved by transformers: ``name -> (directory, transformers model, image token id)``."""
    torch.manual_seed(0)
    out = {}
    for name, fmt in FORMATS.items():
        path = tmp_path_factory.mktemp(name)
        model = fmt.save_reference(
            TINY, path, image_token_id=IMAGE_ID
        )  # IDEFICS names <image> in the tokenizer
        out[name] = (path, model.eval(), IMAGE_ID)
    return out


def _inputs(name: str, image_id: int, model, rows: int = 2, images: int = 2):
    """The same text and ``images`` images per row in transformers' layout and in vlm's: a little
    text, then each image's placeholders followed by more text (each image's tiles and size
    where ``model`` tiles images: ``probe_images``)."""
    g = torch.Generator().manual_seed(1)
    text = torch.randint(5, 90, (rows, 2 + 2 * images + 1), generator=g)
    pictures, placeholders = probe_images(model, rows * images, generator=g)  # in reading order
    parts = [text[:, :2]]
    for i in range(images):
        parts += [torch.full((rows, placeholders), image_id), text[:, 2 + 2 * i : 4 + 2 * i]]
    ids = torch.cat([*parts, text[:, -1:]], dim=1)
    ours = dict(input_ids=ids, **pictures, attention_mask=torch.ones_like(ids))
    return FORMATS[name].hf_inputs(ours, image_id), ours


@pytest.mark.parametrize("name", NAMES)
def test_converted_logits_equal_transformers(checkpoints, name):
    path, hf_model, image_id = checkpoints[name]
    model = vlm.from_pretrained(path).eval()
    hf_inputs, inputs = _inputs(name, image_id, model)
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


@pytest.mark.parametrize("name", NAMES)
def test_converted_greedy_generation_equals_transformers(checkpoints, name):
    path, hf_model, image_id = checkpoints[name]
    model = vlm.from_pretrained(path).eval()
    hf_inputs, inputs = _inputs(name, image_id, model, rows=1)
    prompt = hf_inputs["input_ids"].shape[1]
    with torch.no_grad():  # vlm never generates the <image> token: ask transformers for the same
        expected = hf_model.generate(
            **hf_inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False, suppress_tokens=[image_id]
        )[:, prompt:]
    got = generate(
        model,
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        image_sizes=inputs.get("image_sizes"),
        max_new_tokens=16,
    )
    assert expected.shape == (1, 16)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("name", NAMES)
def test_converted_model_saves_and_reloads_in_vlm_format(checkpoints, name, tmp_path):
    path, hf_model, image_id = checkpoints[name]
    converted = vlm.from_pretrained(path).eval()
    assert main(["save", "--model", str(path), "--out", str(tmp_path / "vlm")]) == 0
    config = json.loads((tmp_path / "vlm" / "config.json").read_text())
    assert {"encoder", "bridge", "decoder"} <= config.keys()  # vlm's own format now
    reloaded = vlm.from_pretrained(tmp_path / "vlm").eval()
    _, inputs = _inputs(name, image_id, converted)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, converted(**inputs).logits, atol=0, rtol=0)
    assert (tmp_path / "vlm" / "tokenizer_config.json").is_file()  # IDEFICS's <image> id lives there
    assert main(["save", "--model", str(path), "--out", str(tmp_path / "half"), "--dtype", "bfloat16"]) == 0
    half = vlm.from_pretrained(tmp_path / "half")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_unsupported_architecture_names_the_supported_formats(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(vlm.ConfigError) as err:
        vlm.from_pretrained(tmp_path)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    for architecture in supported():
        assert architecture in message


def test_every_format_is_registered_once_with_its_converter():
    """CONVERTERS and supported() are read from FORMATS; a name or architecture registers once."""
    assert NAMES[:3] == ["llava", "blip2", "idefics"]
    assert {"llava_next", "llava_onevision", "idefics3", "smolvlm"} <= set(NAMES)
    assert dict(CONVERTERS) == {a: f.convert for f in FORMATS.values() for a in f.architectures}
    assert supported() == sorted(CONVERTERS)
    llava = FORMATS["llava"]
    with pytest.raises(ValueError, match="already registered"):
        register_format(llava)
    with pytest.raises(ValueError, match="already have a converter"):
        register_format(replace(llava, name="llava-again"))
    assert list(FORMATS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_the_connector_names_parts_of_transformers_model(checkpoints, name):
    _, hf_model, _ = checkpoints[name]
    parts = FORMATS[name].connector_of(hf_model)
    assert len(parts) == len(FORMATS[name].connector)
    assert all(isinstance(p, (torch.nn.Module, torch.nn.Parameter)) for p in parts)


def test_idefics_layout_masks_each_token_with_its_latest_image():
    ids = torch.tensor([[1, IMAGE_ID, 7, IMAGE_ID, 8], [IMAGE_ID, 7, 8, IMAGE_ID, 9]])
    pixels = torch.randn(4, 3, SIZE, SIZE)
    hf = FORMATS["idefics"].hf_inputs({"input_ids": ids, "pixel_values": pixels}, IMAGE_ID)
    assert torch.equal(hf["pixel_values"], pixels.view(2, 2, 3, SIZE, SIZE))
    assert hf["image_attention_mask"].tolist() == [
        [[0, 0], [1, 0], [1, 0], [0, 1], [0, 1]],
        [[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]],
    ]
    uneven = torch.tensor([[IMAGE_ID, 7, IMAGE_ID], [IMAGE_ID, 7, 8]])
    with pytest.raises(ValueError, match="as many images"):
        FORMATS["idefics"].hf_inputs({"input_ids": uneven, "pixel_values": pixels[:3]}, IMAGE_ID)


def test_unsupported_variant_is_refused_by_name(tmp_path):
    model = FORMATS["llava"].reference(TINY, IMAGE_ID)
    model.config.vision_feature_layer = [-2, -1]
    model.save_pretrained(tmp_path)
    with pytest.raises(vlm.ConfigError, match="vision_feature_layer"):
        vlm.from_pretrained(tmp_path)


def test_a_checkpoint_missing_tensors_gets_a_clear_error(checkpoints, tmp_path):
    path, _, _ = checkpoints["llava"]
    for name in ("config.json",):
        (tmp_path / name).write_text((path / name).read_text())
    weights = load_file(path / "model.safetensors")
    weights.pop(next(k for k in weights if k.endswith("embeddings.class_embedding")))
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(vlm.ConfigError, match="class_embedding"):
        vlm.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_tensors_the_conversion_leaves_behind_are_named(checkpoints, name, tmp_path, caplog):
    """A full conversion leaves nothing behind (no warning); a tensor with no place in vlm's
    model is named in a warning instead of vanishing silently."""
    path, _, _ = checkpoints[name]
    with caplog.at_level("WARNING", logger="vlm.convert.common"):
        vlm.from_pretrained(path)
    assert "not loaded" not in caplog.text

    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    weights = load_file(path / "model.safetensors")
    weights["video_newline"] = torch.zeros(4)  # e.g. a OneVision video tensor vlm has no use for
    save_file(weights, tmp_path / "model.safetensors")
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlm.convert.common"):
        vlm.from_pretrained(tmp_path)
    assert "1 tensor(s)" in caplog.text and "video_newline" in caplog.text


def test_a_bf16_checkpoint_loads_as_bf16_in_about_its_own_size(tmp_path):
    """No float32 copy and no random initialisation first: the checkpoint's tensors become the
    parameters. Loading plus a forward pass peaks well under twice the checkpoint's size (it was
    3.0x with a float32 model built first); float32 pixels still work, and a cast is one argument."""
    size = replace(bench.SIZES["small"], text_width=512, text_depth=4, text_heads=8, text_ffn=1408)
    checkpoint_bytes = write_checkpoint(tmp_path, size, IMAGE_ID)
    result = measure(tmp_path)
    assert result["dtypes"] == ["torch.bfloat16"]
    assert result["peak_kib"] * 1024 < 2.0 * checkpoint_bytes, result

    model = vlm.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1] + [IMAGE_ID] * model.tokens_per_image + [5, 6, 7]])
    pixels = torch.randn(1, 3, size.image, size.image)
    with torch.no_grad():
        bf16 = model(input_ids=ids, pixel_values=pixels).logits
        cast = vlm.from_pretrained(tmp_path, dtype="float32").eval()
        fp32 = cast(input_ids=ids, pixel_values=pixels).logits
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    torch.testing.assert_close(bf16.float(), fp32, atol=0.05, rtol=0.05)
