"""Idefics3 and SmolVLM both ways: tiny random transformers checkpoints saved with their own
processors (a byte-level BPE tokenizer holding Idefics3's special tokens) load into vlm and
compute what transformers computes, on transformers' processor outputs and on vlm's own; vlm
models with a SigLIP-shaped ViT, a merging linear bridge and split tiling export back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import vlm
from vlm import ConfigError
from vlm.bridges.linear import ProjectorConfig
from vlm.cli import main
from vlm.config import ModelConfig, ProcessorConfig
from vlm.convert import FORMATS, check_export, export_transformers
from vlm.data.loader import tile_pixels
from vlm.data.transforms import encoder_transform
from vlm.decoders.hf import HFDecoderConfig
from vlm.encoders.vit import ViTConfig
from vlm.generate import generate
from vlm.model import build_model
from vlm.processor import Processor
from vlm.tiling.split import FAKE, GLOBAL, SplitConfig

IMAGE = "<image>"
SPECIAL = ["<pad>", "<s>", "</s>", IMAGE, FAKE, GLOBAL, "<end_of_utterance>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
]
CORPUS = [
    "What is in the picture?\n\nA red circle on the left and a blue square.",
    "User: describe it.\nAssistant: two green triangles, one small.\n\n",
    "Where is the yellow star? On the right, above the line.",
] * 4
#: Non-square images (height, width): wide, tall, tiny (scaled up to the longest edge).
SIZES = [(30, 100), (90, 40), (10, 14)]
#: (kind, tile, patch, scale_factor, longest_edge): SmolVLM's 3x3 shuffle as its 81-token tiles.
KINDS = [("Idefics3", 32, 8, 2, 96), ("SmolVLM", 36, 4, 3, 108)]
#: The shape of Idefics3's and SmolVLM's chat templates (over parts; the BOS the tokenizer's).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def bpe_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (merges across newlines, as Llama's) that adds a BOS, with Idefics3's
    special tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", SPECIAL.index("<s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL[3:],
    )


TOKENIZER = bpe_tokenizer()
IMAGE_ID = TOKENIZER.convert_tokens_to_ids(IMAGE)
LLAMA = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=len(TOKENIZER),
    bos_token_id=TOKENIZER.bos_token_id,
    eos_token_id=TOKENIZER.eos_token_id,
    pad_token_id=TOKENIZER.pad_token_id,
)


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_processor(kind: str, tile: int, longest: int, seq_len: int, tokenizer=TOKENIZER):
    settings = dict(
        do_image_splitting=True,
        size={"longest_edge": longest},
        max_image_size={"longest_edge": tile},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    image_processor = getattr(transformers, f"{kind}ImageProcessorPil")(**settings)
    extra = {}
    if kind == "SmolVLM":
        settings.pop("do_image_splitting")
        extra["video_processor"] = transformers.SmolVLMVideoProcessor(**settings)
    return getattr(transformers, f"{kind}Processor")(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len, **extra
    )


def pil_processor(path):
    """The processor saved in ``path`` with the PIL backend's image processor (SmolVLM's video
    processor has no PIL backend to ask the processor for)."""
    processor = transformers.AutoProcessor.from_pretrained(path)
    processor.image_processor = transformers.AutoImageProcessor.from_pretrained(path, backend="pil")
    return processor


@pytest.fixture(scope="module", params=KINDS, ids=[k[0] for k in KINDS])
def checkpoint(request, tmp_path_factory):
    """``(directory, transformers model, its processor)``, saved by transformers."""
    kind, tile, patch, scale, longest = request.param
    torch.manual_seed(0)
    vision = getattr(transformers, f"{kind}VisionConfig")(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=tile,
        patch_size=patch,
        initializer_range=0.2,
    )
    text = transformers.LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})
    config = getattr(transformers, f"{kind}Config")(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=IMAGE_ID,
        scale_factor=scale,
    )
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(config).eval()
    with torch.no_grad():  # wider weights than the initialisation: the images move the logits
        for p in model.model.text_model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path)
    seq_len = (tile // patch // scale) ** 2
    processor = hf_processor(kind, tile, longest, seq_len)
    processor.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(path)
    # The PIL backend: Idefics3's own LANCZOS, vlm's tiles (transformers' default torchvision
    # backend resamples a few levels of 255 apart: test_the_torchvision_backend_is_close).
    return path, model, pil_processor(path)


def vlm_processor(model, tokenizer=TOKENIZER) -> Processor:
    return Processor(
        tokenizer, tokens_per_image=model.tokens_per_image, config=model.config.processor, tiling=model.tiling
    )


def test_settings_come_from_the_checkpoints_files(checkpoint):
    path, hf, processor = checkpoint
    model = vlm.from_pretrained(path)
    tile, longest = hf.config.vision_config.image_size, processor.image_processor.size["longest_edge"]
    assert model.config.processor.tiling == SplitConfig(longest_edge=longest, resample="lanczos")
    assert model.encoder.image_size == tile and model.tokens_per_image == processor.image_seq_len
    assert model.config.bridge == ProjectorConfig(name="linear", bias=False, merge=hf.config.scale_factor)
    assert model.image_token_id == IMAGE_ID
    assert (model.encoder.mean, model.encoder.std) == ((0.5,) * 3, (0.5,) * 3)


def test_logits_equal_transformers_on_its_processor_outputs_and_on_vlms(checkpoint):
    """A batch of rows with images of different sizes (different tile counts), padded: transformers'
    5-D pixel_values with pixel_attention_mask go into vlm's model as they are, and vlm's own
    processor gives the same ids and tiles."""
    path, hf, processor = checkpoint
    model = vlm.from_pretrained(path).eval()
    images = [picture(*s, seed=i) for i, s in enumerate(SIZES)]
    texts = [f"{IMAGE}What is in the picture?", f"{IMAGE}{IMAGE}Where is the star?"]
    inputs = processor(images=[images[:1], images[1:]], text=texts, padding=True, return_tensors="pt")
    ours = vlm_processor(model)
    sizes = [(i.height, i.width) for i in images]
    ids = [
        ours.document_prompt_ids(texts[0], image_sizes=sizes[:1]),
        ours.document_prompt_ids(texts[1], image_sizes=sizes[1:]),
    ]
    batch = ours.pad([{"input_ids": i} for i in ids], side="right")
    assert batch["input_ids"].tolist() == inputs["input_ids"].tolist()
    pixels, _ = tile_pixels(images, model.tiling, encoder_transform(model.encoder))
    real = inputs["pixel_values"].flatten(0, 1)
    real = real[real.flatten(1).ne(0).any(1)]
    torch.testing.assert_close(pixels, real, atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = hf(**inputs).logits
        got_hf_style = model(**inputs).logits
        got = model(**batch, pixel_values=pixels, image_sizes=torch.tensor(sizes)).logits
        moved = (hf(**{**inputs, "pixel_values": -inputs["pixel_values"]}).logits - expected).abs().max()
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(got_hf_style[keep], expected[keep], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-4, rtol=0)
    assert moved > 1e-2


@pytest.mark.parametrize("size", [*SIZES, (64, 64)])
def test_vlms_processor_gives_transformers_tokens_and_pixels(checkpoint, size):
    path, _, processor = checkpoint
    model = vlm.from_pretrained(path)
    image = picture(*size, seed=3)
    text = f"{IMAGE}Describe it."
    theirs = processor(images=[image], text=text, return_tensors="pt")
    ids = vlm_processor(model).document_prompt_ids(text, image_sizes=[size])
    assert ids == theirs["input_ids"][0].tolist()
    pixels, _ = tile_pixels([image], model.tiling, encoder_transform(model.encoder))
    torch.testing.assert_close(pixels, theirs["pixel_values"][0], atol=1e-5, rtol=0)


def test_chat_prompts_are_the_processors_chat_template_and_tiles(checkpoint):
    """The checkpoint's chat template (chat_template.jinja, read with its tokenizer) renders
    Predictor's conversations as transformers' processor does, tiles included."""
    from vlm.eval.predict import Predictor, conversation_inputs

    path, _, processor = checkpoint
    predictor = Predictor(path, device="cpu")
    image = picture(*SIZES[1], seed=4)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "Where is the star?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    theirs = processor(images=[image], text=text, return_tensors="pt")
    texts, images = conversation_inputs(messages)
    ids = predictor.processor.messages_prompt_ids(texts, image_sizes=[SIZES[1]])
    assert ids == theirs["input_ids"][0].tolist()
    torch.testing.assert_close(predictor.pixel_values(images), theirs["pixel_values"][0], atol=1e-5, rtol=0)


def test_greedy_generation_equals_transformers(checkpoint):
    path, hf, processor = checkpoint
    model = vlm.from_pretrained(path).eval()
    ours = vlm_processor(model)
    for i, (size, prompt) in enumerate(zip(SIZES, ["Describe it.", "Where is the star?", "What"])):
        image = picture(*size, seed=10 + i)
        inputs = processor(images=[image], text=IMAGE + prompt, return_tensors="pt")
        ids = torch.tensor([ours.document_prompt_ids(IMAGE + prompt, image_sizes=[size])])
        pixels, _ = tile_pixels([image], model.tiling, encoder_transform(model.encoder))
        with torch.no_grad():  # vlm never generates the <image> token: ask transformers for the same
            expected = hf.generate(
                **inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False, suppress_tokens=[IMAGE_ID]
            )[:, ids.shape[1] :]
        got = generate(model, ids, pixel_values=pixels, image_sizes=torch.tensor([size]), max_new_tokens=12)
        assert got.tolist() == expected.tolist()


def test_an_image_mask_with_padding_inside_an_image_is_refused(checkpoint):
    path, _, processor = checkpoint
    model = vlm.from_pretrained(path).eval()
    inputs = processor(images=[picture(30, 100)], text=f"{IMAGE}Hi", return_tensors="pt")
    inputs["pixel_attention_mask"][0, 0, -1] = 0
    with pytest.raises(ValueError, match="whole tiles"):
        model(**inputs)


# --- vlm -> transformers --------------------------------------------------------------------

SIGLIP = dict(
    class_token=False,
    pre_norm=False,
    patch_bias=True,
    final_norm=True,
    feature_layer=-1,
    act="gelu_tanh",
    mean=(0.5, 0.4, 0.3),
    std=(0.2, 0.25, 0.3),
)


def tiny_model(encoder=None, bridge=None, tiling=None, seed: int = 0):
    """A vlm model with random weights all round: a SigLIP-shaped ViT of 32 px tiles (patch 8),
    a linear bridge merging 2 x 2 patches, a Llama decoder, split tiling at 3 tiles."""
    torch.manual_seed(seed)
    config = ModelConfig(
        encoder=ViTConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, **(encoder or SIGLIP)),
        bridge=bridge or ProjectorConfig(name="linear", bias=False, merge=2),
        decoder=HFDecoderConfig(hf_config=LLAMA, freeze=False),
        image_token_id=IMAGE_ID,
        processor=ProcessorConfig(tiling=tiling or SplitConfig(longest_edge=96), conversation="vicuna_v1"),
    )
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize(
    "tiling", [SplitConfig(longest_edge=96), SplitConfig(longest_edge=32)], ids=["tiles", "global"]
)
def test_export_round_trip(tiling, tmp_path):
    """The export runs in transformers (logits), its processor prepares prompts, conversations and
    images as vlm's does, and it loads back bit for bit. At one tile's longest edge, every image
    is the global image alone."""
    model = tiny_model(tiling=tiling)
    fmt, _ = export_transformers(model, TOKENIZER, tmp_path)
    assert fmt.name == "idefics3" and check_export(model, fmt, tmp_path) < 1e-4
    back = vlm.from_pretrained(tmp_path)
    assert back.config.processor.tiling == model.config.processor.tiling
    assert back.config.bridge == model.config.bridge
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    processor = pil_processor(tmp_path)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(processor).__name__ == "Idefics3Processor"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = picture(40, 90, seed=7)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    vlm_messages = [{"role": "user", "content": f"{IMAGE}\nWhat is it?"}]
    ids = vlm_processor(model).messages_prompt_ids(vlm_messages, image_sizes=[(40, 90)])
    assert inputs["input_ids"][0].tolist() == ids
    assert (
        len(inputs["pixel_values"][0])
        == model.tiling.num_tiles((40, 90))
        == (1 if tiling.longest_edge == 32 else 7)
    )
    pixels, _ = tile_pixels([image], model.tiling, encoder_transform(model.encoder))
    torch.testing.assert_close(inputs["pixel_values"][0], pixels, atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = hf.generate(
            **inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, suppress_tokens=[IMAGE_ID]
        )[:, len(ids) :]
    got = generate(
        model,
        torch.tensor([ids]),
        pixel_values=pixels,
        image_sizes=torch.tensor([(40, 90)]),
        max_new_tokens=8,
    )
    assert got.tolist() == expected.tolist()


def test_vlm_export_as_smolvlm_round_trip(tmp_path, capsys):
    """Idefics3 and SmolVLM both take a split model: ``vlm export --as smolvlm`` picks SmolVLM."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "model", tokenizer=TOKENIZER)
    out = tmp_path / "hf"
    args = ["export", "--model", str(tmp_path / "model"), "--out", str(out), "--as", "smolvlm", "--check"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "SmolVLMForConditionalGeneration" in printed and "check: transformers' logits are" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["SmolVLMForConditionalGeneration"]
    assert check_export(model, FORMATS["smolvlm"], out) < 1e-4
    loaded = transformers.AutoProcessor.from_pretrained(out)
    assert type(loaded).__name__ == "SmolVLMProcessor" and loaded.image_seq_len == model.tokens_per_image
    back = vlm.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


@pytest.mark.parametrize(
    ("to", "match"),
    [
        ("llava", r"no transformers format takes a 'linear' bridge with tiling 'split'; that export takes: "),
        ("nonsense", r"no transformers format named 'nonsense'; the exports: .*smolvlm \(SmolVLMFor"),
    ],
)
def test_export_to_a_format_that_cannot_take_the_model_is_refused(to, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        export_transformers(tiny_model(), TOKENIZER, tmp_path, to=to)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("encoder", "bridge", "tiling", "match"),
    [
        (dict(SIGLIP, class_token=True), None, None, "encoder.class_token=true"),
        (dict(SIGLIP, final_norm=False), None, None, "encoder.final_norm=false"),
        (dict(SIGLIP, final_norm=False, feature_layer=-2), None, None, "encoder.feature_layer=-2"),
        (None, ProjectorConfig(name="linear", bias=True, merge=2), None, "bridge.bias=true"),
        (None, ProjectorConfig(name="mlp2x_gelu", bias=False, merge=2), None, "bridge 'mlp2x_gelu'"),
        (None, None, SplitConfig(longest_edge=96, markers=False), "markers=false"),
        (None, None, SplitConfig(longest_edge=96, max_tiles=5), "max_tiles=5"),
        (None, None, {"name": "none"}, "processor.tiling 'none'"),
    ],
)
def test_what_idefics3_cannot_represent_is_refused_by_name(encoder, bridge, tiling, match):
    model = tiny_model(encoder, bridge, tiling)
    with pytest.raises(ConfigError, match=f"does not export to .*{match}"):
        FORMATS["idefics3"].export(model, TOKENIZER)


def test_a_tokenizer_without_idefics3s_image_tokens_is_refused():
    from vlm.convert import placeholder_tokenizer

    tokenizer = placeholder_tokenizer(len(TOKENIZER))
    with pytest.raises(ConfigError, match="without the <fake_token_around_image> token"):
        FORMATS["idefics3"].export(tiny_model(), tokenizer)


def test_the_torchvision_backend_is_close(checkpoint):
    """transformers loads these image processors with its torchvision backend by default, whose
    LANCZOS is not PIL's: a few levels of 255 from vlm's (and Idefics3's own) pixels."""
    path, _, _ = checkpoint
    model = vlm.from_pretrained(path)
    default = transformers.AutoProcessor.from_pretrained(path)
    image = picture(*SIZES[0])
    theirs = default(images=[image], text=f"{IMAGE}Hi", return_tensors="pt")["pixel_values"][0]
    pixels, _ = tile_pixels([image], model.tiling, encoder_transform(model.encoder))
    assert (pixels - theirs).abs().max() <= 8 * 2 / 255  # 8 levels (std 0.5)
