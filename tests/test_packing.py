"""Sequence packing: several examples per row compute exactly what each computes alone."""

import pytest
import tiny
import torch
from test_processor import red_square_shard, word_tokenizer

from vlm import ConfigError, build_model
from vlm.data.loader import make_loader
from vlm.data.packing import PackedStream
from vlm.data.transforms import image_transform
from vlm.processor import Processor

TURNS = [
    {"task": "caption", "answer": "a red square"},
    {"task": "vqa", "question": "what color is it ?", "answer": "red"},
]


def tiny_model(bridge, decoder, attention="sdpa"):
    tok = word_tokenizer()
    config = tiny.model_config("vit", bridge, decoder, attn_implementation=attention)
    config.decoder.hf_config = {**config.decoder.hf_config, "vocab_size": len(tok)}
    config.image_token_id = tok.convert_tokens_to_ids("<image>")
    model = build_model(config).eval()
    tiny.open_gates(model, 0.5)  # cross-attention bridges: images that matter
    return model, Processor(tok, tokens_per_image=model.tokens_per_image)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("bridge", tiny.BRIDGES)
@pytest.mark.parametrize("decoder", ["gpt2", "llama", "opt"])
def test_packed_samples_compute_exactly_what_each_computes_alone(bridge, decoder, attention):
    """Three samples, each with its own image, in one row (one of them packed turns): every
    sample's logits and loss equal its own row's, so no sample sees another's text or image."""
    model, proc = tiny_model(bridge, decoder, attention)
    samples = [
        proc.encode_turns(TURNS),
        proc.encode("vqa", question="what is it ?", answer="a square"),
        proc.encode("caption", answer="a blue square"),
    ]
    pixels = torch.randn(len(samples), 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    row = proc.pack(samples)
    assert len(row["input_ids"]) == sum(len(s["input_ids"]) for s in samples)
    other = proc.encode("vqa", question="what color is it ?", answer="blue")  # a shorter padded row
    batch = proc.pad([row, other])
    out = model(**batch, pixel_values=torch.cat([pixels, pixels[:1]]), loss_reduction="sum")

    alone_sum = torch.zeros(())
    sample_ids = torch.tensor(row["sample_ids"])
    for k, sample in enumerate(samples):
        alone = model(**proc.pad([sample]), pixel_values=pixels[k : k + 1], loss_reduction="sum")
        torch.testing.assert_close(out.logits[0, sample_ids == k], alone.logits[0], atol=1e-5, rtol=1e-5)
        alone_sum += alone.loss
    alone_sum += model(**proc.pad([other]), pixel_values=pixels[:1], loss_reduction="sum").loss
    torch.testing.assert_close(out.loss, alone_sum, atol=1e-4, rtol=1e-5)


def test_a_packed_sample_is_not_predicted_from_the_one_before():
    _, proc = tiny_model("linear", "gpt2")
    first, second = proc.encode("caption", answer="a red square"), proc.encode("caption", answer="red")
    second["labels"][0] = second["input_ids"][0]  # even a labelled first token
    row = proc.pack([first, second])
    assert row["labels"][len(first["labels"])] == -100
    assert row["sample_ids"] == [0] * len(first["input_ids"]) + [1] * len(second["input_ids"])
    assert "segment_ids" not in row  # no turns: the sample ids alone mask the row


class Examples(torch.utils.data.IterableDataset):
    def __init__(self, lengths):
        self.lengths = lengths

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        for i, n in enumerate(self.lengths):
            yield {
                "input_ids": [i] * n,
                "labels": [-100] * n,
                "pixel_values": torch.full((1, 3, 2, 2), float(i)),
                "task": "caption",
                "key": str(i),
            }


def test_rows_hold_every_example_once_and_never_exceed_the_length():
    _, proc = tiny_model("linear", "gpt2")
    proc.max_length = 10
    lengths = [7, 3, 5, 5, 2, 9, 1, 4, 8, 6]
    rows = list(PackedStream(Examples(lengths), proc, 10, open_rows=3))
    assert all(len(r["input_ids"]) <= 10 for r in rows)
    keys = [k for r in rows for k in r["key"]]
    assert sorted(keys, key=int) == [str(i) for i in range(len(lengths))]
    assert len(rows) == 6  # 50 tokens in rows of 10: first fit over 3 open rows wastes one row
    for r in rows:  # each example's images travel with it, in the row's reading order
        assert [int(p[0, 0, 0, 0]) for p in r["pixel_values"]] == [int(k) for k in r["key"]]
    again = PackedStream(Examples(lengths), proc, 10, open_rows=3)
    assert [r["key"] for r in rows] == [r["key"] for r in again]  # deterministic: exact resume works


def test_rows_shorter_than_an_example_are_refused():
    _, proc = tiny_model("linear", "gpt2")
    with pytest.raises(ConfigError, match="pack_length"):
        PackedStream(Examples([]), proc, proc.max_length - 1)


def test_packed_batches_from_shards_train_a_model(tmp_path):
    red_square_shard(tmp_path / "s.tar", 6)
    model, proc = tiny_model("perceiver", "llama")
    proc.max_length = 32
    transform = image_transform(tiny.IMAGE_SIZE, model.encoder.mean, model.encoder.std, mode="pad")
    plain = list(make_loader(str(tmp_path / "s.tar"), proc, transform, batch_size=4, shuffle_buffer=0))
    packed = list(
        make_loader(str(tmp_path / "s.tar"), proc, transform, batch_size=2, shuffle_buffer=0, pack_length=64)
    )
    assert sum(int(b["attention_mask"].sum()) for b in packed) == sum(
        int(b["attention_mask"].sum()) for b in plain
    )
    assert sum(b["input_ids"].numel() for b in packed) < sum(b["input_ids"].numel() for b in plain)
    batch = packed[0]
    assert batch["image_index"].tolist() == sorted(batch["image_index"].tolist())  # reading order
    assert len(batch["image_index"]) == int((batch["input_ids"] == model.image_token_id).sum())
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "labels", "image_index")}
    model.train()
    loss = model(**inputs, sample_ids=batch["sample_ids"], full_logits=False).loss
    loss.backward()
    gates = [block.attn_gate.grad for block in model.bridge.blocks.values()]  # gates start at 0
    assert torch.isfinite(loss) and any(g.abs().sum() > 0 for g in gates)


def random_layout(generator, rows=3, length=40):
    """Rows of 1-3 samples, each a prefix and 0-3 turns, then padding."""
    segments, samples, valid = [], [], []
    for _ in range(rows):
        seg, sam = [], []
        for k in range(int(torch.randint(1, 4, (1,), generator=generator))):
            seg += [0] * int(torch.randint(1, 5, (1,), generator=generator))
            for turn in range(1, int(torch.randint(1, 4, (1,), generator=generator)) + 1):
                seg += [turn] * int(torch.randint(1, 5, (1,), generator=generator))
            sam += [k] * (len(seg) - len(sam))
        n = min(len(seg), length)
        segments.append(seg[:n] + [0] * (length - n))
        samples.append(sam[:n] + [0] * (length - n))
        valid.append([1] * n + [0] * (length - n))
    return torch.tensor(segments), torch.tensor(samples), torch.tensor(valid)


def test_positions_count_what_each_token_sees():
    """The O(T) positions equal the number of keys each token attends to before itself."""
    from vlm.packing import packed_mask, packed_positions, packed_rule

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        segments, samples, valid = random_layout(generator)
        B, T = segments.shape
        b, q = torch.arange(B)[:, None, None], torch.arange(T)[None, :, None]
        seen = packed_rule(segments, samples, valid)(b, None, q, q.transpose(1, 2))
        expected = seen.sum(-1) - 1
        got = packed_positions(segments, samples)
        assert torch.equal(got[valid.bool()], expected[valid.bool()])
        # Padding may continue a sample past the LM's last position: it gets position 0.
        assert not packed_mask(segments, samples, valid)[1][~valid.bool()].any()
        got = packed_positions(None, samples)  # samples without turns
        expected = packed_rule(None, samples, valid)(b, None, q, q.transpose(1, 2)).sum(-1) - 1
        assert torch.equal(got[valid.bool()], expected[valid.bool()])


@pytest.mark.parametrize("decoder", ["llama", "opt"])  # transformers' GPT-2 has no flex_attention
def test_flex_attention_decoders_take_packed_rows_as_a_block_mask(decoder):
    """With attn_implementation="flex_attention" the packed row goes to the LM as a FlexAttention
    BlockMask, no T x T mask: the logits equal sdpa's dense-mask logits. (FlexAttention has no
    backward on CPU, hence inference here; on GPUs it trains.)"""
    from torch.nn.attention.flex_attention import BlockMask

    model, proc = tiny_model("perceiver", decoder)
    row = proc.pack([proc.encode_turns(TURNS), proc.encode("caption", answer="a blue square")])
    batch = proc.pad([row, proc.encode("vqa", question="what color is it ?", answer="blue")])
    pixels = torch.randn(3, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    with torch.no_grad():
        dense = model(**batch, pixel_values=pixels).logits
        model.decoder.lm.set_attn_implementation("flex_attention")
        seen = []
        hook = model.decoder.lm.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
        )
        flex = model(**batch, pixel_values=pixels).logits
        hook.remove()
    assert isinstance(seen[0], BlockMask)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(flex[real], dense[real], atol=1e-5, rtol=1e-5)
