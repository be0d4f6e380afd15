"""The loader rows: both sides do the same work, draft decoding stays close to full decoding,
and the workers figure follows from the rates."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from vlm.convert import IMAGE_TOKEN_ID
from vlm.data.decode import decode_image
from vlm.data.pipeline import ImageTextShards
from vlm.eval import bench_loader
from vlm.eval.bench import SIZES
from vlm.eval.bench_common import step_flops
from vlm.model import build_model


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return bench_loader.write_shards(tmp_path_factory.mktemp("photos"), 12, per_shard=5)


def _jpeg(size, **save) -> bytes:
    out = io.BytesIO()
    bench_loader.photo(np.random.default_rng(0), size).save(out, format="JPEG", **save)
    return out.getvalue()


def test_the_shards_hold_every_image_once(shards):
    assert len(shards) == 3  # 5 + 5 + 2
    keys = [s["key"] for s in ImageTextShards(shards, shuffle_shards=False, shuffle_buffer=0)]
    assert keys == [f"{i:08d}" for i in range(12)]


@pytest.mark.parametrize("pixels", [224, 336])
def test_vlm_and_the_baseline_make_the_same_batches(shards, pixels):
    ours = torch.cat(list(bench_loader.vlm_batches(shards, pixels, batch=5)))
    theirs = torch.cat(list(bench_loader.baseline_batches(shards, pixels, batch=5)))
    assert ours.shape == theirs.shape == (12, 3, pixels, pixels)
    # Same decode, same crop; the bicubic resizes (tensor vs Pillow) differ by rounding only
    # (two different images differ by about 1 on average).
    assert (ours - theirs).abs().mean() < 1e-3


def test_draft_decoding_scales_large_jpegs_only_as_far_as_the_encoder_allows():
    data = _jpeg((640, 480), quality=90)
    full, _ = decode_image(data)
    assert full.size == (640, 480)
    assert decode_image(data, draft_size=224)[0].size == (320, 240)  # 1/2: the short side stays >= 224
    assert decode_image(data, draft_size=112)[0].size == (160, 120)  # 1/4
    assert decode_image(data, draft_size=336)[0].size == (640, 480)  # 1/2 would be 240 < 336
    png = io.BytesIO()
    full.save(png, format="PNG")
    assert decode_image(png.getvalue(), draft_size=112)[0].size == (640, 480)  # JPEG only


def test_draft_decoding_gives_nearly_the_same_pixels(shards):
    full = torch.cat(list(bench_loader.vlm_batches(shards, 224, batch=6)))
    draft = torch.cat(list(bench_loader.vlm_batches(shards, 224, batch=6, draft=True)))
    assert full.shape == draft.shape
    # In normalised units (about 4 per full range): under 1 % of the range on average.
    assert (full - draft).abs().mean() < 0.04


def test_loader_rows_compare_each_variant_with_the_baseline(shards):
    rows = bench_loader.loader_rows(shards, 12, batch=5, iters=2, pixels=(112,))
    assert [r["measure"] for r in rows] == [
        "shards to pixels 112 px, one worker",
        "shards to pixels 112 px, one worker, draft decoding",
    ]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["vlm"] / r["transformers"])
        low, median, high = r["ratio_spread"]
        assert 0 < low <= median <= high


def test_a_pass_that_loses_images_is_an_error(shards):
    with pytest.raises(AssertionError, match="gave 12 images, not the 13"):
        bench_loader.loader_rows(shards, 13, batch=5, iters=1, pixels=(112,))


def test_workers_needed_is_the_image_rate_over_one_workers():
    assert bench_loader.workers_needed(100.0, 40.0) == 3
    assert bench_loader.workers_needed(80.0, 40.0) == 2
    assert bench_loader.workers_needed(10.0, 40.0, images_per_sample=8) == 2


def stage1_flops_of_forward(size):
    """The count through the model's own ``forward`` on a real CPU model (uninitialised weights)."""
    model = build_model(bench_loader.stage1_config(size), empty=True).to_empty(device="cpu")
    text = size.prompt + size.answer
    ids = torch.full((1, model.tokens_per_image + text), 5)
    ids[0, 1 : 1 + model.tokens_per_image] = IMAGE_TOKEN_ID
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < ids.shape[1] - size.answer, -100)
    pixels = torch.zeros(1, 3, size.image, size.image)
    return step_flops(
        lambda: model(ids, pixel_values=pixels, labels=labels, full_logits=False).loss.backward()
    )


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_stage1_flops_from_shapes_equal_the_real_forwards_count(name):
    # The benchmark counts on fake tensors (the large size would take many CPU minutes for real).
    assert bench_loader.stage1_flops(SIZES[name]) == stage1_flops_of_forward(SIZES[name])


def test_stage1_flops_match_the_matmuls_of_a_tiny_model():
    size = SIZES["tiny"]
    flops = bench_loader.stage1_flops(size)
    # The frozen LM's forward alone (2 FLOPs per weight per token) is a floor.
    tokens = (size.image // size.patch) ** 2 + size.prompt + size.answer
    layer = (
        2
        * size.text_width
        * (size.text_width * 2 + 2 * size.text_width * size.text_kv_heads // size.text_heads)
    )
    layer += 2 * 3 * size.text_width * size.text_ffn
    assert flops > tokens * size.text_depth * layer
    feeding = bench_loader.feeding(
        flops, [dict(measure="shards to pixels 32 px, one worker", vlm=1e6)], pixels=32
    )
    assert feeding["samples_per_s"] == pytest.approx(0.5 * 989.4e12 / flops)
    assert feeding["workers"] == {
        "with full decoding": bench_loader.workers_needed(feeding["samples_per_s"], 1e6)
    }
