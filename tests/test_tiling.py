"""Tiling (``vlm.tiling``) against transformers' own processors and models: LLaVA-NeXT's AnyRes
tiles, token counts and feature packing, Idefics3's splitting and its text; then tiled images
through training batches, generation and ``Predictor``."""

import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
import transformers
from PIL import Image

from vlm import build_model
from vlm.data.loader import collate, tile_pixels
from vlm.data.transforms import image_transform
from vlm.encoders.base import CLIP_MEAN, CLIP_STD
from vlm.generate import generate
from vlm.processor import Processor
from vlm.registry import TILINGS
from vlm.schema import ConfigError
from vlm.tiling.anyres import AnyRes, AnyResConfig
from vlm.tiling.split import Split, SplitConfig

sys.path.insert(0, str(Path(__file__).parent))
from saved import save_tiny_model  # noqa: E402

TILE = 32
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # LLaVA-NeXT's grids at 32 px
# Wide, tall, square, tiny and odd sizes: grids of every shape, padding on either axis.
SIZES = [(45, 77), (80, 50), (64, 64), (20, 20), (33, 101), (120, 35), (97, 61)]


def picture(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_next_processor():
    return transformers.LlavaNextImageProcessor(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=PINPOINTS,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def anyres(**options):
    return AnyRes(
        AnyResConfig(pinpoints=PINPOINTS, **options), tile_size=TILE, tokens_per_tile=16, grid=(4, 4)
    )


@pytest.mark.parametrize("size", SIZES)
def test_anyres_tiles_are_llava_next_pixels(size):
    image = picture(*size)
    ours, sizes = tile_pixels([image], anyres(), image_transform(TILE, CLIP_MEAN, CLIP_STD))
    theirs = hf_next_processor()(images=[image], return_tensors="pt")
    assert sizes == [size] and theirs["image_sizes"].tolist() == [list(size)]
    assert ours.shape == theirs["pixel_values"][0].shape  # base image first, then the grid
    torch.testing.assert_close(ours, theirs["pixel_values"][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", SIZES)
def test_anyres_token_count_is_llava_next_processors(size):
    """LlavaNextProcessor's count for a 4x4 patch grid per tile (patch 8 on 32 px tiles), with
    no class token (``num_additional_image_tokens = 0``)."""
    from vlm.data.shapes import tokenizer

    processor = transformers.LlavaNextProcessor(
        image_processor=hf_next_processor(),
        tokenizer=tokenizer(),
        patch_size=8,
        num_additional_image_tokens=0,
    )
    theirs = processor._get_number_of_features(*size, TILE, TILE)
    assert anyres().num_tokens(size) == theirs


def tiny_llava_next():
    vision = transformers.CLIPVisionConfig(
        image_size=TILE,
        patch_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    text = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    config = transformers.LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_grid_pinpoints=PINPOINTS,
        image_token_index=63,
    )
    return transformers.LlavaNextModel(config).eval()


@pytest.mark.parametrize("max_features", [None, 1])
def test_anyres_arrangement_is_llava_next_packing(max_features):
    """Unpadding, the newline after each row and the base tokens first, as LlavaNextModel's
    ``pack_image_features`` (and OneVision's shrink, ``anyres_max_1`` at this size)."""
    hf = tiny_llava_next()
    tiling = AnyRes(
        AnyResConfig(pinpoints=PINPOINTS, max_tiles_features=max_features),
        tile_size=TILE,
        tokens_per_tile=16,
        grid=(4, 4),
        text_dim=16,
    )
    with torch.no_grad():
        tiling.image_newline.copy_(hf.image_newline)
    sizes = torch.tensor(SIZES)
    features = [torch.randn(tiling.num_tiles(tuple(s)), 16, 16) for s in SIZES]
    if max_features is None:
        theirs, lengths = hf.pack_image_features(features, sizes, "default", image_newline=hf.image_newline)
    else:
        onevision = transformers.LlavaOnevisionModel(
            transformers.LlavaOnevisionConfig(
                vision_config=hf.config.vision_config.to_dict(),
                text_config=hf.config.text_config.to_dict(),
                image_grid_pinpoints=PINPOINTS,
            )
        ).eval()
        with torch.no_grad():
            onevision.image_newline.copy_(hf.image_newline)
        theirs, lengths = onevision.pack_image_features(
            features,
            sizes,
            image_newline=onevision.image_newline,
            vision_aspect_ratio=f"anyres_max_{max_features}",
        )
    ours = torch.cat([tiling.arrange(f, tuple(s)) for f, s in zip(features, SIZES)])
    theirs = torch.cat(theirs) if isinstance(theirs, list) else theirs
    torch.testing.assert_close(ours, theirs)
    assert [tiling.num_tokens(tuple(s)) for s in SIZES] == list(lengths)


def split(**options):
    return Split(SplitConfig(longest_edge=4 * TILE, **options), tile_size=TILE, tokens_per_tile=4)


def hf_idefics3_processor():
    return transformers.Idefics3ImageProcessorPil(
        do_image_splitting=True,
        size={"longest_edge": 4 * TILE},
        max_image_size={"longest_edge": TILE},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


@pytest.mark.parametrize("size", SIZES)
def test_split_tiles_are_idefics3_pixels(size):
    image = picture(*size)
    ours, _ = tile_pixels([image], split(), image_transform(TILE, (0.5,) * 3, (0.5,) * 3))
    theirs = hf_idefics3_processor()(images=[[image]], return_tensors="pt", return_row_col_info=True)
    rows, cols = theirs["rows"][0][0], theirs["cols"][0][0]
    assert split().tile_grid(size) == (rows, cols)
    assert ours.shape[0] == rows * cols + 1  # the tiles, then the global image last
    torch.testing.assert_close(ours, theirs["pixel_values"][0][: len(ours)], atol=2 / 255, rtol=0)


@pytest.mark.parametrize("size", SIZES)
def test_split_text_is_idefics3_processors(size):
    image_processor = hf_idefics3_processor()
    image_inputs = image_processor(images=[[picture(*size)]], return_row_col_info=True)
    hf = transformers.Idefics3Processor.__new__(transformers.Idefics3Processor)
    hf.fake_image_token, hf.image_token, hf.global_image_tag = (
        "<fake_token_around_image>",
        "<image>",
        "<global-img>",
    )
    hf.image_seq_len = 4
    assert split().image_text(size, "<image>") == hf.replace_image_token(image_inputs, 0)


def test_max_tiles_bounds_every_image():
    assert max(anyres(max_tiles=3).num_tiles(s) for s in SIZES) <= 3
    assert max(split(max_tiles=5).num_tiles(s) for s in SIZES) <= 5
    assert split().num_tiles((20, 20)) == 17  # small images are scaled up, as Idefics3 does
    with pytest.raises(ConfigError, match="max_tiles=1 leaves no grid"):
        anyres(max_tiles=1)


def test_tiling_bad_settings():
    with pytest.raises(ConfigError, match="multiples of the tile size"):
        AnyRes(AnyResConfig(pinpoints=[[30, 60]]), tile_size=TILE, tokens_per_tile=16, grid=(4, 4))
    with pytest.raises(ConfigError, match="unknown tiling 'tiles'"):
        TILINGS.parse({"name": "tiles"})
    config = tiny.model_config("vit", "mlp2x_gelu", "llama")
    config.processor.tiling = TILINGS.parse({"name": "anyres", "max_tiles_features": 4})
    config.encoder.keep_class_token = True  # tokens that are no grid cannot be shrunk as one
    with pytest.raises(ConfigError, match="needs a bridge with a token grid"):
        build_model(config)


# --- tiled images through vlm -------------------------------------------------------------

#: (bridge, tiling): prefix bridges with each kind, and a cross-attention bridge whose media are
#: each image's tiles.
TRIED = [
    ("mlp2x_gelu", {"name": "anyres"}),
    ("mlp2x_gelu", {"name": "split", "max_tiles": 5}),
    ("mlp2x_gelu", {"name": "anyres", "newline": False}),
    ("perceiver", {"name": "split", "max_tiles": 5}),
    ("qformer", {"name": "anyres"}),  # queries per tile: tokens that are not a grid
]
IMAGE_SIZES = [(40, 90), (100, 50), (20, 20)]


@pytest.fixture(scope="module", params=TRIED, ids=lambda t: t[0] + "-" + "-".join(map(str, t[1].values())))
def tiled_dir(request, tmp_path_factory):
    bridge, tiling = request.param
    directory = tmp_path_factory.mktemp("tiled")
    return save_tiny_model(directory, bridge=bridge, tiling=TILINGS.parse(tiling), max_length=1024)


def test_predictor_batches_rows_of_different_tile_counts(tiled_dir):
    """Rows holding different numbers of tiles generate together (left-padded, KV cache) what
    each generates alone, greedy and with beam search."""
    from vlm.eval.predict import Predictor

    predictor = Predictor(tiled_dir, device="cpu")
    tiling = predictor.model.tiling
    assert len({tiling.num_tiles(s) for s in IMAGE_SIZES}) > 1
    images = [picture(*s, seed=i) for i, s in enumerate(IMAGE_SIZES)]
    together = predictor.predict(images, "caption")
    assert together == [predictor.predict([image], "caption")[0] for image in images]
    assert len(set(together)) > 1  # the images steer the text
    predictor.generation.num_beams = 2
    beams = predictor.predict(images, "caption")
    assert beams == [predictor.predict([image], "caption")[0] for image in images]


def test_tiled_training_batch_matches_one_at_a_time(tiled_dir):
    """Collated examples with tiles (and an image shared by two examples) give each example the
    loss it has alone: the tiles land on their own image's placeholders."""
    from vlm.hub import from_pretrained
    from vlm.weights import load_tokenizer

    model = from_pretrained(tiled_dir).eval()
    processor = Processor(
        load_tokenizer(tiled_dir),
        tokens_per_image=model.tokens_per_image,
        config=model.config.processor,
        tiling=model.tiling,
    )
    transform = image_transform(TILE, CLIP_MEAN, CLIP_STD)
    examples = []
    for i, size in enumerate(IMAGE_SIZES):
        pixels, sizes = tile_pixels([picture(*size, seed=i)], model.tiling, transform)
        for answer in ("a red circle", "blue"):
            encoded = processor.encode("caption", answer=answer, image_sizes=sizes)
            examples.append({**encoded, "pixel_values": pixels, "image_sizes": sizes})
    batch = collate(examples, processor)
    assert len(batch["pixel_values"]) == sum(model.tiling.num_tiles(s) for s in IMAGE_SIZES)
    inputs = ("input_ids", "attention_mask", "labels", "pixel_values", "image_index", "image_sizes")
    with torch.no_grad():
        together = model(**{k: batch[k] for k in inputs}, loss_reduction="sum").loss
        alone = sum(
            model(**{k: collate([e], processor)[k] for k in inputs}, loss_reduction="sum").loss
            for e in examples
        )
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_truncation_never_cuts_an_images_tiles(tiled_dir):
    from vlm.hub import from_pretrained
    from vlm.weights import load_tokenizer

    model = from_pretrained(tiled_dir)
    tokenizer = load_tokenizer(tiled_dir)
    sizes = [(40, 90), (100, 50)]
    full = Processor(
        tokenizer, tokens_per_image=model.tokens_per_image, config=model.config.processor, tiling=model.tiling
    ).encode_document("<image> red <image> blue circle", image_sizes=sizes)
    first = model.tiling.num_tokens(sizes[0])
    for max_length in range(first, len(full["input_ids"])):
        processor = Processor(
            tokenizer,
            tokens_per_image=model.tokens_per_image,
            config=model.config.processor,
            tiling=model.tiling,
            max_length=max_length,
        )
        encoded = processor.encode_document("<image> red <image> blue circle", image_sizes=sizes)
        if encoded is None:
            continue
        placeholders = sum(t == model.image_token_id for t in encoded["input_ids"])
        kept = encoded["num_images"]
        assert placeholders == sum(model.tiling.num_tokens(s) for s in sizes[:kept])


def test_tiled_model_needs_image_sizes(tiled_dir):
    from vlm.hub import from_pretrained

    model = from_pretrained(tiled_dir).eval()
    ids = torch.full((1, model.tiling.num_tokens((40, 90))), model.image_token_id)
    pixels = torch.randn(model.tiling.num_tiles((40, 90)), 3, TILE, TILE)
    # The grid's layout needs the size, and so does a cross-attention bridge to group the tiles.
    if model.config.processor.tiling.name == "anyres" or not model.bridge.tokens_in_text:
        with pytest.raises(ValueError, match="pass image_sizes"):
            model(ids, pixels)
    else:  # split tiles are in order whatever the size (Idefics3's inputs carry none)
        torch.testing.assert_close(
            model(ids, pixels).logits, model(ids, pixels, image_sizes=torch.tensor([[40, 90]])).logits
        )
    with pytest.raises(ValueError, match="tile\\(s\\) were given"):
        model(ids, pixels[:1], image_sizes=torch.tensor([[40, 90]]))
    out = generate(model, ids, pixel_values=pixels, image_sizes=torch.tensor([[40, 90]]), max_new_tokens=2)
    assert out.shape == (1, 2)


def test_transformers_tiled_layouts_are_taken(tiled_dir):
    """LLaVA-NeXT's 5-D pixel_values (zero-padded on the tile axis, with image_sizes) and
    Idefics3's (all-zero padding images) give the logits of vlm's flat tiles."""
    from vlm.hub import from_pretrained
    from vlm.weights import load_tokenizer

    model = from_pretrained(tiled_dir).eval()
    processor = Processor(
        load_tokenizer(tiled_dir),
        tokens_per_image=model.tokens_per_image,
        config=model.config.processor,
        tiling=model.tiling,
    )
    transform = image_transform(TILE, CLIP_MEAN, CLIP_STD)
    images = [picture(*s, seed=i) for i, s in enumerate(IMAGE_SIZES[:2])]
    pixels, sizes = tile_pixels(images, model.tiling, transform)
    ids = torch.tensor([processor.document_prompt_ids("<image> red <image>", image_sizes=sizes)])
    flat = model(ids, pixels, image_sizes=torch.tensor(sizes)).logits
    counts = [model.tiling.num_tiles(s) for s in sizes]
    padded = torch.zeros(len(images), max(counts), *pixels.shape[1:])
    for i, tiles in enumerate(pixels.split(counts)):
        padded[i, : len(tiles)] = tiles
    torch.testing.assert_close(model(ids, padded, image_sizes=torch.tensor(sizes)).logits, flat)


def test_an_image_that_cannot_fit_is_named_with_its_tokens(tmp_path):
    from vlm.eval.predict import InputError, Predictor

    directory = save_tiny_model(tmp_path, tiling=TILINGS.parse({"name": "split"}), max_length=200)
    predictor = Predictor(directory, device="cpu")
    # The 20 x 20 image is scaled up into 4 x 4 tiles and the global one, as Idefics3 does.
    with pytest.raises(InputError, match=r"largest image \(20x20\) takes 272 tokens \(17 tile\(s\)"):
        predictor.predict([picture(20, 20), picture(40, 90)], "caption")


def test_a_cross_attention_bridge_sees_all_of_an_images_tiles():
    """Text after a tiled image attends to all of that image's tiles' latents and to no other
    image's: the same as that image's tiles joined into one image's latents."""
    from vlm.bridges.base import media_at

    torch.manual_seed(0)
    model = build_model(tiny.model_config("vit", "perceiver", "llama")).eval()
    tiny.open_gates(model)
    block = next(iter(model.bridge.blocks.values()))
    visual = model.bridge(torch.randn(6, 16, 32))  # two images of three tiles each, in one row
    M, D = visual.shape[1:]
    positions = torch.zeros(1, 9, dtype=torch.bool)
    positions[0, [1, 5]] = True
    h = torch.randn(1, 9, model.decoder.hidden_size)
    tiled = media_at(visual, positions, tiles=torch.tensor([3, 3]))
    joined = media_at(visual.reshape(2, 3 * M, D), positions)
    with torch.no_grad():
        torch.testing.assert_close(block(h, tiled), block(h, joined))
        # and a packed second sample sees none of the first's tiles
        samples = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
        tiled, joined = (
            media_at(visual, positions, samples, tiles=torch.tensor([3, 3])),
            media_at(visual.reshape(2, 3 * M, D), positions, samples),
        )
        torch.testing.assert_close(block(h, tiled), block(h, joined))


def test_the_feature_cache_holds_tiles(shapes_dir, tmp_path):
    """A frozen encoder's features of each image's tiles, cached with the images' sizes, train
    the same losses as the tiles' pixels do."""
    from test_train import losses, tiny_recipe

    from vlm.train.recipe import recipe_from_dict
    from vlm.train.trainer import train

    def frozen(out, cache):
        tree = tiny_recipe(shapes_dir, out, max_steps=4, cache_features=cache)
        tree["model"]["encoder"]["freeze"] = True
        tree["model"]["processor"]["tiling"] = {"name": "anyres", "grids": [[1, 2], [2, 1]]}
        return recipe_from_dict(tree)

    train(frozen(tmp_path / "pixels", False), progress=False)
    train(frozen(tmp_path / "cached", True), progress=False)
    expected, got = losses(tmp_path / "pixels"), losses(tmp_path / "cached")
    assert len(got) == 4 and max(abs(a - b) for a, b in zip(expected, got)) < 1e-5


def test_continuous_batching_takes_tiled_rows(tiled_dir):
    """Tiled requests joining a running batch (vlm serve's engine) get the tokens generate()
    gives each alone."""
    from vlm.engine import BatchedGeneration, Request
    from vlm.eval.predict import Predictor

    predictor = Predictor(tiled_dir, device="cpu")
    model, processor = predictor.model, predictor.processor
    requests, got, expected = [], [], []
    for i, size in enumerate([*IMAGE_SIZES, (64, 64)]):
        image = picture(*size, seed=i)
        ids = processor.prompt_ids("caption", image_sizes=[size])
        pixels, sizes = tile_pixels([image], model.tiling, predictor.transform)
        sizes = torch.tensor(sizes)
        tokens: list[int] = []
        got.append(tokens)
        requests.append(
            Request(
                ids,
                pixels,
                image_sizes=sizes,
                max_new_tokens=6,
                on_token=lambda t, out=tokens: out.append(t) is None,
            )
        )
        new = generate(model, torch.tensor([ids]), None, pixels, image_sizes=sizes, max_new_tokens=6)[
            0
        ].tolist()
        expected.append(new)
    batch = BatchedGeneration(model, eos_token_id=None, pad_token_id=processor.pad_token_id)
    batch.admit(requests[:2])
    for request in requests[2:]:
        batch.step()
        batch.admit([request])
    while len(batch):
        batch.step()
    assert got == expected


def test_vlm_serve_tiles_image_urls(tiled_dir):
    """Images of any size sent to vlm serve as image_url parts are tiled: several at once, each
    answered as Predictor.chat answers it alone."""
    import json
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from serving import MODEL, image_part, running_server

    from vlm.eval.predict import Predictor

    predictor = Predictor(tiled_dir, device="cpu")
    predictor.generation.max_new_tokens = 8
    # Two sizes (the tiny Llama's context, 128 positions, holds no more of the split markers).
    images = [picture(*size, seed=i) for i, size in enumerate(IMAGE_SIZES[:2])]

    def ask(base, image):
        body = {
            "model": MODEL,
            "max_tokens": 8,
            "temperature": 0,
            "messages": [{"role": "user", "content": [image_part(image), {"type": "text", "text": "what?"}]}],
        }
        request = urllib.request.Request(
            f"{base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]

    with running_server(tiled_dir) as (base, _), ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda image: ask(base, image), images))
    expected = [
        predictor.chat(
            [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "what?"}]}]
        )
        for im in images
    ]
    assert replies == expected
