"""LLaVA-NeXT and LLaVA-OneVision both ways: tiny random transformers models saved with their own
processors load into vlm and compute what transformers computes, on images of several
non-square sizes; vlm's processor gives transformers' processor's tokens and pixels; exports
come back bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import vlm
from vlm.bridges.linear import ProjectorConfig
from vlm.cli import main
from vlm.config import ModelConfig, ProcessorConfig
from vlm.convert import FORMATS, IMAGE_TOKEN_ID, check_export, export_transformers
from vlm.convert.llava_next import reference_pinpoints
from vlm.decoders.hf import HFDecoderConfig
from vlm.encoders.base import CLIP_MEAN, CLIP_STD
from vlm.encoders.vit import ViTConfig
from vlm.eval import bench
from vlm.eval.predict import Predictor
from vlm.generate import generate
from vlm.model import build_model
from vlm.tiling.anyres import AnyRes, AnyResConfig

TINY = bench.SIZES["tiny"]  # 32 px tiles of 8 px patches: 16 tokens a tile
NAMES = ["llava_next", "llava_onevision"]
# Wide, tall, tiny and odd sizes (height, width): grids of 1x2 to 3x3 tiles, padding either way.
SIZES = [(45, 77), (80, 50), (33, 101), (120, 35), (97, 91), (20, 20)]
WORDS = "Describe the image briefly . What color is it ? Answer with a single word or phrase".split()


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def word_tokenizer(vocab: int) -> transformers.PreTrainedTokenizerFast:
    """Words split on whitespace, ``<image>`` at id 4, a BOS in front (as Llama's tokenizers),
    and OneVision's ``<video>`` (which its processor counts in every text)."""
    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>", *WORDS]
    words += [f"w{i}" for i in range(vocab - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>", "<video>"],
    )


def hf_processor(name: str, tokenizer) -> transformers.ProcessorMixin:
    """The processors these checkpoints ship, at the tiny size: NeXT's with the CLIP class token
    counted (``num_additional_image_tokens = 1``), OneVision's with SigLIP's statistics and
    ``anyres_max_2`` (not the classes' defaults: the files must be read)."""
    side, pinpoints = TINY.image, reference_pinpoints(TINY.image)
    if name == "llava_next":
        return transformers.LlavaNextProcessor(
            image_processor=transformers.LlavaNextImageProcessor(
                size={"shortest_edge": side},
                crop_size={"height": side, "width": side},
                image_grid_pinpoints=pinpoints,
                image_mean=list(CLIP_MEAN),
                image_std=list(CLIP_STD),
            ),
            tokenizer=tokenizer,
            patch_size=TINY.patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    size, stats = {"height": side, "width": side}, dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=pinpoints, **stats
        ),
        video_processor=transformers.LlavaOnevisionVideoProcessor(size=size, **stats),
        tokenizer=tokenizer,
        num_image_tokens=(side // TINY.patch) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_2",
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``name -> (directory, transformers model, its processor, vlm's Predictor)``."""
    out = {}
    for name in NAMES:
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name)
        hf = FORMATS[name].reference(TINY, IMAGE_TOKEN_ID).eval()
        hf.save_pretrained(path)
        processor = hf_processor(name, word_tokenizer(TINY.vocab))
        processor.save_pretrained(path)
        out[name] = (path, hf, processor, Predictor(path, device="cpu"))
    return out


def transformers_batch(processor, images, prompts):
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    inputs.pop("batch_num_images", None)  # OneVision's: one image per row, its default
    return dict(inputs)


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers_on_images_of_different_sizes(checkpoints, name):
    """One batch, three sizes (a wide 1x3 grid, a 3x3 grid OneVision shrinks, a tall one):
    vlm's model called with transformers' processor outputs, and with vlm's own tiles."""
    _, hf, processor, predictor = checkpoints[name]
    model = predictor.model
    sizes = [(45, 77), (97, 91), (120, 35)]
    images = [picture(*s, seed=i) for i, s in enumerate(sizes)]
    prompts = ["<image>\nDescribe the image briefly.", "w7 <image> w9", "What color is it? <image>"]
    inputs = transformers_batch(processor, images, prompts)
    assert inputs["pixel_values"].dim() == 5  # (images, most tiles, 3, H, W), zero-padded
    with torch.no_grad():
        expected = hf(**inputs).logits
        theirs = model(**inputs).logits
        ours = model(
            inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=predictor.pixel_values(images),
            image_sizes=inputs["image_sizes"],
        ).logits
        moved = (
            (hf(**{**inputs, "pixel_values": inputs["pixel_values"].flip(0)}).logits - expected).abs().max()
        )
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(theirs[real], expected[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[real], expected[real], atol=1e-4, rtol=0)
    assert moved > 1e-2, "the images barely move the logits: the comparison would not test them"


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_vlm_processor_gives_transformers_tokens_and_pixels(checkpoints, name, size):
    """The same prompt ids (placeholders counted for the size) and the same tiles (base image
    first, bicubic, centred black padding), and as many placeholders as the model has features."""
    _, _, processor, predictor = checkpoints[name]
    image = picture(*size)
    for task, question in (("caption", None), ("vqa", "What color is it?")):
        text = predictor.processor.prompt(task, question=question)
        theirs = processor(images=image, text=text, return_tensors="pt")
        ours = predictor.processor.prompt_ids(task, question=question, image_sizes=[size])
        assert ours == theirs["input_ids"][0].tolist()
    pixels = predictor.pixel_values([image])
    assert theirs["image_sizes"].tolist() == [list(size)]
    torch.testing.assert_close(pixels, theirs["pixel_values"][0, : len(pixels)], atol=1e-5, rtol=0)
    assert not theirs["pixel_values"][0, len(pixels) :].any()  # the rest pads the tile axis
    tiling = predictor.model.tiling
    width = predictor.model.decoder.hidden_size
    features = tiling.arrange(torch.zeros(len(pixels), tiling.tokens_per_tile, width), size)
    assert ours.count(IMAGE_TOKEN_ID) == len(features) == tiling.num_tokens(size)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_through_vlms_processor_equal_transformers_generate(checkpoints, name):
    _, hf, processor, predictor = checkpoints[name]
    for seed, (size, task, question) in enumerate(
        [((45, 77), "caption", None), ((80, 50), "vqa", "What color is it?"), ((97, 91), "caption", None)]
    ):
        image = picture(*size, seed=seed)
        ids = predictor.processor.prompt_ids(task, question=question, image_sizes=[size])
        inputs = transformers_batch(processor, [image], [predictor.processor.prompt(task, question=question)])
        with torch.no_grad():  # vlm never generates the <image> token: neither may transformers
            expected = hf.generate(
                **inputs,
                max_new_tokens=16,
                min_new_tokens=16,
                do_sample=False,
                suppress_tokens=[IMAGE_TOKEN_ID],
            )[:, len(ids) :]
        got = generate(
            predictor.model,
            torch.tensor([ids]),
            pixel_values=predictor.pixel_values([image]),
            image_sizes=torch.tensor([size]),
            max_new_tokens=16,
        )
        assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("name", NAMES)
def test_transformers_5_model_layout_loads_the_same_model(checkpoints, name, tmp_path):
    """transformers saves the hub's names (``vision_tower.*``, ``language_model.model.*``,
    ``image_newline``); its own in-memory names (``model.*``, ``lm_head``) load the same."""
    path, hf, _, predictor = checkpoints[name]
    for file in ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / file).write_bytes((path / file).read_bytes())
    state = hf.state_dict()
    assert {"model.image_newline", "lm_head.weight"} <= state.keys()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    ours, again = predictor.model.state_dict(), vlm.from_pretrained(tmp_path).state_dict()
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)


def test_the_tiling_comes_from_the_checkpoints_files(checkpoints, tmp_path):
    next_model = checkpoints["llava_next"][3].model
    onevision = checkpoints["llava_onevision"][3].model
    pinpoints = reference_pinpoints(TINY.image)
    assert next_model.config.processor.tiling == AnyResConfig(pinpoints=pinpoints)
    assert onevision.config.processor.tiling == AnyResConfig(pinpoints=pinpoints, max_tiles_features=2)
    assert next_model.encoder.mean == CLIP_MEAN and onevision.encoder.mean == (0.5, 0.5, 0.5)
    assert next_model.config.encoder.class_token and not onevision.config.encoder.class_token

    path = checkpoints["llava_next"][0]
    for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / file).write_bytes((path / file).read_bytes())
    processor = checkpoints["llava_next"][2]
    processor.image_processor.image_grid_pinpoints = pinpoints[:2]
    try:
        processor.save_pretrained(tmp_path)
    finally:
        processor.image_processor.image_grid_pinpoints = pinpoints
    with pytest.raises(vlm.ConfigError, match="image_grid_pinpoints .* differ from config.json's"):
        vlm.from_pretrained(tmp_path)


def test_a_processor_counting_other_placeholders_than_the_features_is_named(checkpoints, tmp_path, caplog):
    """A NeXT processor config without the class token (``num_additional_image_tokens = 0``, as
    some older files have) counts one placeholder fewer per image than the model's features."""
    path = checkpoints["llava_next"][0]
    for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / file).write_bytes((path / file).read_bytes())
    settings = json.loads((path / "processor_config.json").read_text())
    assert settings["num_additional_image_tokens"] == 1
    settings["num_additional_image_tokens"] = 0
    (tmp_path / "processor_config.json").write_text(json.dumps(settings))
    with caplog.at_level("WARNING", logger="vlm.convert.llava_next"):
        vlm.from_pretrained(tmp_path)
    assert "counts 15 placeholders for a tile whose features are 16 tokens" in caplog.text


def test_the_real_llava_next_configuration_counts_2634_tokens_for_899_by_1024():
    """336 px tiles, patch 14, LLaVA-NeXT's pinpoints, no weights: vlm's count and
    LlavaNextProcessor's (with the class token its strategy drops) agree."""
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-hf's files
    tiling = AnyRes(AnyResConfig(pinpoints=pinpoints), tile_size=336, tokens_per_tile=576, grid=(24, 24))
    processor = transformers.LlavaNextProcessor.__new__(transformers.LlavaNextProcessor)
    processor.image_processor = transformers.LlavaNextImageProcessor(image_grid_pinpoints=pinpoints)
    processor.patch_size, processor.num_additional_image_tokens = 14, 1
    assert (
        tiling.num_tokens((899, 1024)) == processor._get_number_of_features(899, 1024, 336, 336) - 1 == 2634
    )


LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": TINY.vocab,
}


def siglip_shaped_model() -> vlm.VisionLanguageModel:
    """vlm's own model with a SigLIP-shaped ViT, a linear bridge and AnyRes grids (no pinpoints,
    no anyres_max): what goes to OneVision."""
    torch.manual_seed(0)
    config = ModelConfig(
        encoder=ViTConfig(
            image_size=32,
            patch_size=8,
            width=32,
            depth=2,
            num_heads=2,
            class_token=False,
            pre_norm=False,
            patch_bias=True,
            feature_layer=-1,
        ),
        bridge=ProjectorConfig(name="linear"),
        decoder=HFDecoderConfig(hf_config=LLAMA, freeze=False),
        image_token_id=IMAGE_TOKEN_ID,
        processor=ProcessorConfig(tiling=AnyResConfig(grids=[[1, 2], [2, 1], [2, 2]])),
    )
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("name", [*NAMES, "vlm-siglip-linear"])
def test_export_round_trips_bit_for_bit(checkpoints, name, tmp_path):
    """The converted models go back to their own format, vlm's SigLIP-shaped one to OneVision;
    transformers' logits equal vlm's (``check_export``) and the export loads back unchanged."""
    if name in checkpoints:
        predictor = checkpoints[name][3]
        model, tokenizer, target = predictor.model, predictor.tokenizer, name
    else:
        model, tokenizer, target = siglip_shaped_model(), word_tokenizer(TINY.vocab), "llava_onevision"
    fmt, out = export_transformers(model, tokenizer, tmp_path / "hf")
    assert fmt.name == target
    assert check_export(model, fmt, out) < 1e-4
    back = vlm.from_pretrained(out)
    assert back.config.processor.tiling.pinpoints == [list(p) for p in model.tiling.pinpoints]
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # The exported processor prepares a non-square image as vlm does.
    image, size = picture(80, 50), (80, 50)
    inputs = transformers.AutoProcessor.from_pretrained(out)(
        images=image, text="<image> What color is it?", return_tensors="pt"
    )
    assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum() == model.tiling.num_tokens(size)


def test_vlm_export_check_passes_on_a_converted_checkpoint(checkpoints, tmp_path, capsys):
    path = checkpoints["llava_onevision"][0]
    args = ["export", "--model", str(path), "--to", "transformers", "--out", str(tmp_path), "--check"]
    assert main(args) == 0
    assert "check: transformers' logits are" in capsys.readouterr().out
    assert type(transformers.AutoModelForImageTextToText.from_pretrained(tmp_path)).__name__ == (
        "LlavaOnevisionForConditionalGeneration"
    )


def test_options_the_formats_lack_are_refused_by_name(checkpoints, tmp_path):
    model = checkpoints["llava_next"][3].model
    tiling = model.config.processor.tiling
    try:
        tiling.max_tiles_features = 4
        with pytest.raises(vlm.ConfigError, match="max_tiles_features=4"):
            export_transformers(model, checkpoints["llava_next"][3].tokenizer, tmp_path)
    finally:
        tiling.max_tiles_features = None
    assert not any(tmp_path.iterdir())
