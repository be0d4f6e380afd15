"""``vlm export --to transformers``: a vlm model runs in transformers and comes back unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch
import transformers
from PIL import Image
from safetensors import safe_open

import vlm
from vlm import ConfigError
from vlm.bridges.linear import ProjectorConfig
from vlm.bridges.qformer import QFormerConfig
from vlm.config import ModelConfig
from vlm.convert import IMAGE_TOKEN_ID, export_transformers, placeholder_tokenizer
from vlm.data.transforms import encoder_transform
from vlm.decoders.hf import HFDecoderConfig
from vlm.encoders.clip import CLIPConfig
from vlm.encoders.vit import ViTConfig
from vlm.generate import generate
from vlm.model import build_model

VOCAB = 128
LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
}
OPT = {
    "model_type": "opt",
    "hidden_size": 32,
    "ffn_dim": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "vocab_size": VOCAB,
    "word_embed_proj_dim": 32,
}
EVA = dict(feature_layer=-1, keep_class_token=True, final_norm=True, pre_norm=False, patch_bias=True)
GPT2 = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 2,
    "n_positions": 128,
    "vocab_size": VOCAB,
}

# Two more open_clip towers, beside tiny.TINY_CLIP (GELU): OpenAI's QuickGELU, and a ResNet.
TINY_QUICKGELU, TINY_RESNET = "vlm-tiny-ViT-quickgelu", "vlm-tiny-RN"
_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
OPEN_CLIP_CONFIGS = {
    TINY_QUICKGELU: {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": _TEXT,
    },
    TINY_RESNET: {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
        "text_cfg": _TEXT,
    },
}


@pytest.fixture(scope="module", autouse=True)
def _open_clip_towers(tmp_path_factory):
    import json

    import open_clip

    directory = tmp_path_factory.mktemp("open_clip_towers")
    for name, config in OPEN_CLIP_CONFIGS.items():
        if name not in open_clip.list_models():
            (directory / f"{name}.json").write_text(json.dumps(config))
            open_clip.add_model_config(directory / f"{name}.json")


# Options that differ from the defaults: which layer, the class token, the activation, the norm
# statistics, biases, the decoder family.
KINDS = {
    "mlp2x_gelu, llama, full features": (
        dict(
            feature_layer=-1,
            keep_class_token=True,
            act="quick_gelu",
            mean=(0.5, 0.4, 0.3),
            std=(0.2, 0.25, 0.3),
        ),
        ProjectorConfig(name="mlp2x_gelu", bias=False),
        LLAMA,
    ),
    "linear, gpt2, penultimate patches": (
        dict(feature_layer=-2, act="gelu_tanh"),
        ProjectorConfig(name="linear", bias=True),
        GPT2,
    ),
    "mlp2x_gelu, gpt2, open_clip tower": (
        CLIPConfig(model=tiny.TINY_CLIP, feature_layer=-2, keep_class_token=True),
        ProjectorConfig(name="mlp2x_gelu"),
        GPT2,
    ),
    "linear, llama, open_clip quick_gelu tower, last layer": (
        CLIPConfig(model=TINY_QUICKGELU, feature_layer=-1),
        ProjectorConfig(name="linear", bias=False),
        LLAMA,
    ),
    "qformer, opt": (
        dict(EVA, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
        QFormerConfig(
            num_queries=4,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=48,
            cross_attention_frequency=1,
            layer_norm_eps=1e-6,
        ),
        OPT,
    ),
}
#: The class each kind exports to, and the prompt its processor takes (BLIP-2's puts the query
#: tokens in front by itself).
TARGETS = {
    "llava": ("LlavaForConditionalGeneration", "w1 <image> w7 w9"),
    "blip2": ("Blip2ForConditionalGeneration", "w1 w7 w9"),
}


def tiny_model(encoder: dict | CLIPConfig, bridge: ProjectorConfig, decoder: dict, seed: int = 0):
    """A model with random weights all round; ``encoder``: a ViT's options, or an open_clip tower."""
    torch.manual_seed(seed)
    if isinstance(encoder, dict):
        encoder = ViTConfig(image_size=32, patch_size=8, width=32, depth=3, num_heads=2, **encoder)
    config = ModelConfig(
        encoder=encoder,
        bridge=bridge,
        decoder=HFDecoderConfig(hf_config=decoder, freeze=False),
        image_token_id=IMAGE_TOKEN_ID,
    )
    model = build_model(config).eval()
    with torch.no_grad():  # random weights all round, biases and norms included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module", params=list(KINDS))
def exported(request, tmp_path_factory):
    model = tiny_model(*KINDS[request.param])
    tokenizer = placeholder_tokenizer(VOCAB)
    path = tmp_path_factory.mktemp("export")
    fmt, _ = export_transformers(model, tokenizer, path)
    return model, tokenizer, path, fmt


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_transformers_loads_the_export_and_gives_the_same_logits(exported):
    model, _, path, fmt = exported
    hf = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(hf).__name__ == TARGETS[fmt.name][0]
    g = torch.Generator().manual_seed(1)
    text = torch.randint(5, VOCAB, (2, 7), generator=g)
    ids = torch.cat([text[:, :1], torch.full((2, model.tokens_per_image), IMAGE_TOKEN_ID), text[:, 1:]], 1)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        ours = model(ids, pixel_values=pixels).logits
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_greedy_tokens_through_transformers_processor_and_generate_equal_vlms(exported):
    model, _, path, fmt = exported
    hf = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    image = _image()
    inputs = processor(images=image, text=TARGETS[fmt.name][1], return_tensors="pt")
    ids = inputs["input_ids"]
    assert (ids == IMAGE_TOKEN_ID).sum() == model.tokens_per_image  # the processor expands as vlm does
    ours_pixels = encoder_transform(model.encoder)(image)[None]
    assert (inputs["pixel_values"] - ours_pixels).abs().max() < 1e-5  # same preprocessing
    # vlm never generates an image placeholder (it would have no image): neither may transformers.
    with torch.no_grad():
        theirs = hf.generate(
            **inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID]
        )[:, ids.shape[1] :]
    ours = generate(model, ids, pixel_values=ours_pixels, max_new_tokens=16)
    assert ours.tolist() == theirs.tolist()


#: An open_clip ViT's tensors by the names of vlm's ViT, which reads transformers' CLIP tower
#: back (written out here, not taken from vlm's tables). ``proj`` (into CLIP's joint space) has
#: no place in a LLaVA tower.
OPEN_CLIP_AS_VIT = {
    "class_embedding": "class_token",
    "positional_embedding": "pos_embed",
    "conv1.": "patch_embed.",
    "ln_pre.": "norm_pre.",
    "ln_post.": "norm.",
    "transformer.resblocks.": "blocks.",
    "ln_1.": "norm1.",
    "ln_2.": "norm2.",
    "attn.in_proj_": "attn.qkv.",
    "attn.out_proj.": "attn.out.",
    "mlp.c_fc.": "mlp.0.",
    "mlp.c_proj.": "mlp.2.",
}


def _as_vit(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key == "encoder.tower.proj":
            continue
        if key.startswith("encoder.tower."):
            key = key.replace("encoder.tower.", "encoder.")
            for old, new in OPEN_CLIP_AS_VIT.items():
                key = key.replace(f".{old}", f".{new}")
        out[key] = value
    return out


def test_the_export_loads_back_into_vlm_bit_for_bit(exported):
    model, _, path, _ = exported
    back = vlm.from_pretrained(path)
    assert back.config.bridge == model.config.bridge
    ours, theirs = model.state_dict(), back.state_dict()
    if model.config.encoder.name == "clip":  # it comes back as vlm's ViT, of the same shape
        encoder = back.config.encoder
        exported = model.config.encoder
        assert (encoder.name, encoder.feature_layer, encoder.keep_class_token) == (
            "vit",
            exported.feature_layer,
            exported.keep_class_token,
        )
        assert (encoder.mean, encoder.std) == (model.encoder.mean, model.encoder.std)
        ours = _as_vit(ours)
    else:
        assert back.config.encoder == model.config.encoder
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(
    ("encoder", "bridge", "match"),
    [
        (dict(stem="conv"), ProjectorConfig(), "encoder.stem='conv'"),
        (
            dict(pre_norm=False, patch_bias=True),
            ProjectorConfig(),
            "encoder.patch_bias=true, encoder.pre_norm=false",
        ),
        (dict(final_norm=True), ProjectorConfig(), "encoder.final_norm=true"),
        (dict(), ProjectorConfig(merge=2), "bridge.merge=2"),
        (CLIPConfig(model=tiny.TINY_CLIP, final_norm=True), ProjectorConfig(), "encoder.final_norm=true"),
        (CLIPConfig(model=TINY_RESNET, feature_layer=-1), ProjectorConfig(), "'vlm-tiny-RN' \\(not a ViT\\)"),
    ],
)
def test_options_without_a_transformers_counterpart_are_refused_by_name(encoder, bridge, match, tmp_path):
    model = tiny_model(encoder, bridge, LLAMA)
    with pytest.raises(ConfigError, match=f"does not export to .*{match}"):
        export_transformers(model, placeholder_tokenizer(VOCAB), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_vlm_export_writes_a_checkpoint_transformers_loads(tmp_path, capsys):
    from vlm.cli import main

    model = tiny_model(*KINDS["mlp2x_gelu, llama, full features"])
    model.save_pretrained(tmp_path / "model", tokenizer=placeholder_tokenizer(VOCAB))
    assert (
        main(
            [
                "export",
                "--model",
                str(tmp_path / "model"),
                "--to",
                "transformers",
                "--out",
                str(tmp_path / "hf"),
                "--check",
            ]
        )
        == 0
    )
    assert "check: transformers' logits are" in capsys.readouterr().out
    hf = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "LlavaForConditionalGeneration"
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (
        tmp_path / "hf" / "processor_config.json"
    ).is_file()


def test_a_qformer_on_a_clip_like_tower_is_refused_naming_each_option(tmp_path):
    model = tiny_model({}, KINDS["qformer, opt"][1], OPT)
    with pytest.raises(ConfigError, match="Blip2ForConditionalGeneration: encoder.feature_layer=-2, "):
        export_transformers(model, placeholder_tokenizer(VOCAB), tmp_path)


def test_the_demo_recipes_model_exports_and_transformers_pipeline_answers_as_vlm(tmp_path):
    from vlm.cli.commands import export_demo_model
    from vlm.data.shapes import generate as shape_sample
    from vlm.data.shapes import tokenizer as shapes_tokenizer
    from vlm.eval.predict import Predictor
    from vlm.train.recipe import RECIPES, load_recipe
    from vlm.train.trainer import bind_tokenizer
    from vlm.weights import save_pretrained

    tokenizer = shapes_tokenizer()
    model = build_model(bind_tokenizer(load_recipe(RECIPES / "shapes.toml").model_config(), tokenizer))
    save_pretrained(model.eval(), tmp_path / "model", tokenizer=tokenizer)
    samples = [shape_sample("test", i) for i in range(4)]
    asked = [{"image": s.image, "question": s.qa[i]["question"]} for i, s in enumerate(samples)]
    predictions = Predictor(str(tmp_path / "model")).predict(
        [a["image"] for a in asked], "vqa", [a["question"] for a in asked]
    )
    assert any(predictions)  # random weights answer at length: the texts to agree on
    asked = [{**a, "prediction": p} for a, p in zip(asked, predictions)]
    result = export_demo_model(str(tmp_path / "model"), tmp_path / "hf", asked)
    assert result["architecture"] == "Idefics3ForConditionalGeneration"
    assert result["max_logit_difference"] < 1e-5
    assert (result["questions"], result["same_answers"]) == (4, 4)
    back = vlm.from_pretrained(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    # The published Idefics3 / SmolVLM checkpoints' layout, which vLLM's loader maps one to one.
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    prefixes = ("model.vision_model.", "model.connector.", "model.text_model.", "lm_head.")
    assert all(k.startswith(prefixes) for k in keys), sorted(k for k in keys if not k.startswith(prefixes))
    assert {
        "model.vision_model.embeddings.patch_embedding.weight",
        "model.vision_model.post_layernorm.weight",
        "model.connector.modality_projection.proj.weight",
        "model.text_model.embed_tokens.weight",
        "model.text_model.layers.2.self_attn.q_proj.weight",
        "model.text_model.norm.weight",
        "lm_head.weight",
    } <= keys


IDEFICS_BRIDGE = dict(
    num_latents=4,
    depth=2,
    num_heads=2,
    head_dim=16,
    mlp_act="relu",
    cross_attention_interval=1,
    xattn_heads=4,
    xattn_head_dim=8,
    xattn_mlp_ratio=2.0,
    xattn_norm="rmsnorm",
    xattn_norm_eps=1e-6,
    xattn_mlp="swiglu",
)


@pytest.mark.parametrize(
    "encoder",
    [
        dict(feature_layer=-1, keep_class_token=True),
        CLIPConfig(model=tiny.TINY_CLIP, feature_layer=-1, keep_class_token=True),
    ],
    ids=["vit", "open_clip"],
)
def test_a_perceiver_model_exports_to_idefics_and_comes_back(encoder, tmp_path):
    from vlm.bridges.perceiver import PerceiverConfig
    from vlm.convert import FORMATS

    llama = dict(LLAMA, num_key_value_heads=4)  # IDEFICS's decoder has no grouped-query attention
    model = tiny_model(encoder, PerceiverConfig(**IDEFICS_BRIDGE), llama)
    fmt, _ = export_transformers(model, placeholder_tokenizer(VOCAB), tmp_path)
    hf = transformers.IdeficsForVisionText2Text.from_pretrained(tmp_path).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, VOCAB, (2, 7), generator=g)
    ids[:, 1] = IMAGE_TOKEN_ID
    inputs = dict(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32, generator=g))
    with torch.no_grad():
        ours = model(**inputs).logits
        theirs = hf(**FORMATS["idefics"].hf_inputs(inputs, IMAGE_TOKEN_ID)).logits
    assert fmt.name == "idefics" and (ours - theirs).abs().max() < 1e-4
    ours, theirs = _as_vit(model.state_dict()), vlm.from_pretrained(tmp_path).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_perceiver_with_options_idefics_lacks_is_refused_naming_them(tmp_path):
    from vlm.bridges.perceiver import PerceiverConfig

    bridge = PerceiverConfig(**dict(IDEFICS_BRIDGE, placement="last", mlp_act="gelu"))
    model = tiny_model(dict(feature_layer=-1, keep_class_token=True), bridge, LLAMA)
    with pytest.raises(
        ConfigError, match="grouped-query attention.*bridge.placement='last', bridge.mlp_act='gelu'"
    ):
        export_transformers(model, placeholder_tokenizer(VOCAB), tmp_path)


def test_greedy_tokens_through_idefics_processor_and_generate_equal_vlms(tmp_path):
    from vlm.bridges.perceiver import PerceiverConfig

    llama = dict(LLAMA, num_key_value_heads=4)
    model = tiny_model(
        dict(feature_layer=-1, keep_class_token=True), PerceiverConfig(**IDEFICS_BRIDGE), llama
    )
    # IdeficsProcessor puts a <fake_token_around_image> on either side of each image.
    tokenizer = placeholder_tokenizer(VOCAB - 1)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>"]})
    assert len(tokenizer) == VOCAB
    export_transformers(model, tokenizer, tmp_path)
    hf = transformers.IdeficsForVisionText2Text.from_pretrained(tmp_path).eval()
    processor = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__ == "IdeficsProcessor"
    image = _image(3)
    inputs = processor(images=[image], text=["w7"], return_tensors="pt")
    ids = inputs["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[0].tolist()) == [
        "<s>",
        "<fake_token_around_image>",
        "<image>",
        "<fake_token_around_image>",
        "w7",
    ]
    ours_pixels = encoder_transform(model.encoder)(image)[None]
    assert (inputs["pixel_values"][0] - ours_pixels).abs().max() < 1e-5
    with torch.no_grad():  # the image reaches the text (the gates are open)
        other = encoder_transform(model.encoder)(_image(4))[None]
        assert (
            model(ids, pixel_values=ours_pixels).logits - model(ids, pixel_values=other).logits
        ).abs().max() > 1e-3
        theirs = hf.generate(
            **inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID]
        )[:, ids.shape[1] :]
    ours = generate(model, ids, pixel_values=ours_pixels, max_new_tokens=16)
    assert ours.tolist() == theirs.tolist()


def test_the_exported_processor_prepares_a_non_square_image_as_vlm_does(exported):
    model, _, path, _ = exported
    processor = transformers.AutoProcessor.from_pretrained(path)
    rng = np.random.default_rng(5)
    for size in ((80, 50), (45, 77)):  # odd margins: where centre crops round differently
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        theirs = processor.image_processor(image, return_tensors="pt")["pixel_values"]
        ours = encoder_transform(model.encoder)(image)[None]
        assert (theirs - ours).abs().max() < 1e-5


def test_the_readmes_export_command_and_transformers_snippet_run(tmp_path, monkeypatch, capsys):
    """The README's "Back to transformers" commands, as written, on a tiny model."""
    import shlex
    from pathlib import Path

    from vlm.cli import main

    section = (Path(__file__).parents[1] / "README.md").read_text().split("### Back to transformers", 1)[1]
    command = section.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    model = tiny_model(*KINDS["mlp2x_gelu, llama, full features"])
    model.save_pretrained("runs/my-model", tokenizer=placeholder_tokenizer(VOCAB))
    _image(6).save("photo.jpg")
    # DIR: a model directory saved with its tokenizer
    args = ["runs/my-model" if word == "DIR" else word for word in shlex.split(command)]
    assert args[0] == "vlm" and main(args[1:]) == 0
    capsys.readouterr()
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split()  # the generated text: the tokenizer's words
    assert printed and set(printed) <= set(placeholder_tokenizer(VOCAB).get_vocab())


def test_the_export_check_finds_a_wrong_weight(exported, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from vlm.convert import check_export

    model, _, path, fmt = exported
    assert check_export(model, fmt, path) < 1e-4
    shutil.copytree(path, tmp_path / "broken")
    weights = load_file(tmp_path / "broken" / "model.safetensors")
    name = next(k for k in weights if k.split(".")[-2] in ("linear_1", "language_projection"))  # the bridge
    # Noise, not a constant: the pre-norm LMs (GPT-2, OPT) are blind to a uniform shift.
    weights[name] = weights[name] + torch.randn(
        weights[name].shape, generator=torch.Generator().manual_seed(0)
    )
    save_file(weights, tmp_path / "broken" / "model.safetensors", metadata={"format": "pt"})
    assert check_export(model, fmt, tmp_path / "broken") > 1e-2
