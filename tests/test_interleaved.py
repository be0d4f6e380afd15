"""Conversations and interleaved documents from shards to a training step, for every bridge:
several images per sample at their places, text-only samples, packing and the feature cache."""

import pytest
import tiny
import torch
from PIL import Image
from test_packing import tiny_model

from vlm.data.loader import make_loader
from vlm.data.pipeline import ImageTextShards
from vlm.data.transforms import image_transform
from vlm.data.writers import Record, encode_png, write_shards
from vlm.train.feature_cache import build_feature_cache

COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (200, 200, 10), (10, 200, 200)]


def png(i):
    return encode_png(Image.new("RGB", (20, 16), COLOURS[i % len(COLOURS)]))


def mixed_records():
    return [
        Record(
            [png(0), png(1)],
            {
                "messages": [
                    {"role": "user", "content": "<image> <image> what color is it ?"},
                    {"role": "assistant", "content": "red"},
                    {"role": "user", "content": "what color is it ?"},
                    {"role": "assistant", "content": "blue"},
                ]
            },
        ),
        Record(
            [], {"messages": [{"role": "user", "content": "red ?"}, {"role": "assistant", "content": "blue"}]}
        ),
        Record([png(2), png(3), png(4)], {"document": "<image> red square <image> blue <image> red"}),
        Record(png(0), {"caption": "a red square"}),
    ]


def write_mixed(tmp_path):
    summary = write_shards(mixed_records(), tmp_path / "shards")
    assert summary.written == 4 and not summary.skipped
    return summary.shards


def transform_for(model):
    return image_transform(tiny.IMAGE_SIZE, model.encoder.mean, model.encoder.std, mode="pad")


def inputs(batch):
    keys = (
        "input_ids",
        "pixel_values",
        "image_features",
        "attention_mask",
        "labels",
        "image_index",
        "sample_ids",
    )
    return {k: batch[k] for k in keys if k in batch}


def test_samples_keep_their_images_in_order_and_text_only_ones_have_none(tmp_path):
    samples = {s["key"]: s for s in ImageTextShards(write_mixed(tmp_path), shuffle_buffer=0)}
    first, text_only, document = samples["000000000"], samples["000000001"], samples["000000002"]
    assert [im.getpixel((0, 0)) for im in first["images"]] == COLOURS[:2]
    assert "image" not in text_only and text_only["text"]["messages"][1]["content"] == "blue"
    assert [im.getpixel((0, 0)) for im in document["images"]] == COLOURS[2:5]


@pytest.mark.parametrize("pack_length", [0, 160])
@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_conversations_and_documents_train_every_bridge(tmp_path, bridge, pack_length):
    model, proc = tiny_model(bridge, "llama")
    proc.max_length = 120
    loader = make_loader(
        write_mixed(tmp_path),
        proc,
        transform_for(model),
        batch_size=4,
        shuffle_buffer=0,
        pack_length=pack_length,
    )
    batches = list(loader)
    tasks = sorted(t for b in batches for t in (b["task"] if not pack_length else sum(b["task"], [])))
    assert tasks == ["caption", "chat", "chat", "document"]
    images = sum(len(b["image_index"]) for b in batches if "image_index" in b)
    assert images == 2 + 3 + 1  # the text-only conversation brings none
    for batch in batches:
        placeholders = int((batch["input_ids"] == model.image_token_id).sum())
        assert placeholders == len(batch.get("image_index", [])) * model.tokens_per_image
        # Labels: assistant turns and document text only, never an image or a prompt.
        labelled = batch["input_ids"][batch["labels"] != -100]
        assert model.image_token_id not in labelled.tolist()
        model.train()
        loss = model(**inputs(batch), full_logits=False).loss
        loss.backward()
        assert torch.isfinite(loss)


def test_a_document_cut_by_max_length_keeps_only_the_images_before_the_cut(tmp_path):
    model, proc = tiny_model("mlp2x_gelu", "gpt2")
    document = Record([png(2), png(3), png(4)], {"document": "<image> red <image> blue <image> red"})
    shards = write_shards([document], tmp_path / "shards").shards
    proc.max_length = 1 + model.tokens_per_image + 2 + model.tokens_per_image // 2  # inside image 2
    (batch,) = list(make_loader(shards, proc, transform_for(model), batch_size=1, shuffle_buffer=0))
    assert len(batch["image_index"]) == 1 and proc.truncated == 1
    assert int((batch["input_ids"] == model.image_token_id).sum()) == model.tokens_per_image
    assert torch.isfinite(model(**inputs(batch)).loss)


def test_a_batch_of_text_only_conversations_has_no_images(tmp_path):
    model, proc = tiny_model("perceiver", "gpt2")
    text_only = mixed_records()[1]
    shards = write_shards([text_only, text_only], tmp_path / "shards").shards
    (batch,) = list(make_loader(shards, proc, transform_for(model), batch_size=2, shuffle_buffer=0))
    assert "pixel_values" not in batch and "image_index" not in batch
    assert torch.isfinite(model(**inputs(batch)).loss)


def test_the_feature_cache_keeps_documents_and_text_only_samples(tmp_path):
    model, proc = tiny_model("perceiver", "llama")
    model.config.encoder.freeze = True
    cache = build_feature_cache(
        model, write_mixed(tmp_path)[0], tmp_path / "cache", resize="pad", device="cpu"
    )
    cached = {s["key"]: s for s in ImageTextShards(cache, shuffle_buffer=0)}
    assert cached["000000002"]["features"].shape[0] == 3 and "features" not in cached["000000001"]
    direct = list(
        make_loader(write_mixed(tmp_path), proc, transform_for(model), batch_size=4, shuffle_buffer=0)
    )
    from_cache = list(make_loader(cache, proc, transform_for(model), batch_size=4, shuffle_buffer=0))
    model.eval()
    torch.testing.assert_close(
        model(**inputs(from_cache[0])).loss, model(**inputs(direct[0])).loss, rtol=1e-5, atol=1e-5
    )
