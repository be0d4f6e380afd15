"""Generation: the KV cache changes nothing but speed; batching, beams and sampling behave."""

import pytest
import tiny
import torch

from vlm import build_model
from vlm.attention import MultiHeadAttention
from vlm.generate import generate

EOS = 2


def model_for(bridge, decoder="llama"):
    torch.manual_seed(0)
    model = build_model(tiny.model_config("vit", bridge, decoder)).eval()
    with torch.no_grad():  # larger weights than HF's init: varied tokens instead of one repeated
        for p in model.decoder.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    tiny.open_gates(model)  # cross-attention bridges: so the images really steer the text
    return model


def prompts(model, lengths=(3, 6), images_per_row=(1, 2), seed=0):
    """Left-padded prompts with their images placed among the text."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length, n in zip(lengths, images_per_row):
        ids = []
        for _ in range(n):
            ids += [model.image_token_id] * model.tokens_per_image + torch.randint(
                3, tiny.VOCAB, (1,), generator=g
            ).tolist()
        rows.append(ids + torch.randint(3, tiny.VOCAB, (length,), generator=g).tolist())
    width = max(map(len, rows))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        mask[i, width - len(ids) :] = 1
    pixels = torch.randn(sum(images_per_row), 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, generator=g)
    return input_ids, mask, pixels


@pytest.mark.parametrize("decoder", ["llama", "gpt2"])
@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_cached_generation_equals_recomputing_everything(bridge, decoder):
    model = model_for(bridge, decoder)
    input_ids, mask, pixels = prompts(model)
    cached = generate(model, input_ids, mask, pixels, max_new_tokens=12)
    full = generate(model, input_ids, mask, pixels, max_new_tokens=12, use_cache=False)
    assert cached.shape == (2, 12) and torch.equal(cached, full)
    assert len(set(cached[0].tolist())) > 1  # a real sequence, not one token repeated


@pytest.mark.parametrize("decoder", ["llama", "gpt2"])
@pytest.mark.parametrize("bridge", ["linear", "perceiver"])
def test_static_cache_gives_the_dynamic_cache_tokens(bridge, decoder):
    """A static cache (fixed shapes, for compiled steps) changes nothing, left padding and beams
    included."""
    model = model_for(bridge, decoder)
    input_ids, mask, pixels = prompts(model)
    for options in ({}, {"num_beams": 3}):
        dynamic = generate(model, input_ids, mask, pixels, max_new_tokens=10, **options)
        static = generate(model, input_ids, mask, pixels, max_new_tokens=10, cache="static", **options)
        assert torch.equal(static, dynamic), options


def test_bad_cache_settings_are_refused():
    model = model_for("linear")
    input_ids, mask, pixels = prompts(model)
    with pytest.raises(ValueError, match="static"):
        generate(model, input_ids, mask, pixels, cache="paged")
    with pytest.raises(ValueError, match="compile needs"):
        generate(model, input_ids, mask, pixels, compile=True)


@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_batched_generation_equals_one_by_one(bridge):
    model = model_for(bridge)
    input_ids, mask, pixels = prompts(model, lengths=(2, 7), images_per_row=(1, 1))
    batched = generate(model, input_ids, mask, pixels, max_new_tokens=10)
    for row in range(2):
        keep = mask[row].bool()
        alone = generate(
            model, input_ids[row : row + 1, keep], None, pixels[row : row + 1], max_new_tokens=10
        )
        assert torch.equal(alone[0], batched[row, : alone.shape[1]])


@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_beam_search_with_one_beam_is_greedy(bridge):
    model = model_for(bridge)
    input_ids, mask, pixels = prompts(model)
    greedy = generate(model, input_ids, mask, pixels, max_new_tokens=10)
    assert torch.equal(generate(model, input_ids, mask, pixels, max_new_tokens=10, num_beams=1), greedy)
    assert torch.equal(
        generate(model, input_ids, mask, pixels, max_new_tokens=10, num_beams=1, do_sample=False), greedy
    )


@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_beam_search_finds_a_likelier_sequence_and_caches_exactly(bridge):
    model = model_for(bridge)
    input_ids, mask, pixels = prompts(model)
    beams = generate(model, input_ids, mask, pixels, max_new_tokens=6, num_beams=4, length_penalty=0.0)
    assert torch.equal(
        beams,
        generate(
            model, input_ids, mask, pixels, max_new_tokens=6, num_beams=4, length_penalty=0.0, use_cache=False
        ),
    )
    greedy = generate(model, input_ids, mask, pixels, max_new_tokens=6)

    def logprob(new):
        full = torch.cat([input_ids, new], dim=1)
        out = model(full, pixels, torch.cat([mask, torch.ones_like(new)], dim=1))
        logp = out.logits[:, input_ids.shape[1] - 1 : -1].log_softmax(-1)
        return logp.gather(-1, new[..., None])[..., 0].sum(-1)

    assert (logprob(beams) >= logprob(greedy) - 1e-4).all()


def test_generation_stops_at_eos_and_pads():
    model = model_for("linear")
    input_ids, mask, pixels = prompts(model)
    free = generate(model, input_ids, mask, pixels, max_new_tokens=8)
    stop = int(free[0, 2])  # pretend the third token of row 0 is the end of sequence
    out = generate(model, input_ids, mask, pixels, max_new_tokens=8, eos_token_id=stop, pad_token_id=0)
    first = (out[0] == stop).nonzero()[0].item()
    assert first <= 2 and (out[0, first + 1 :] == 0).all()


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = model_for("mlp2x_gelu")
    input_ids, mask, pixels = prompts(model)
    a = generate(model, input_ids, mask, pixels, max_new_tokens=8, do_sample=True, seed=3, temperature=2.0)
    b = generate(model, input_ids, mask, pixels, max_new_tokens=8, do_sample=True, seed=3, temperature=2.0)
    c = generate(model, input_ids, mask, pixels, max_new_tokens=8, do_sample=True, seed=4, temperature=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, input_ids, mask, pixels, max_new_tokens=8)
    assert torch.equal(
        generate(model, input_ids, mask, pixels, max_new_tokens=8, do_sample=True, top_k=1), greedy
    )
    assert torch.equal(
        generate(model, input_ids, mask, pixels, max_new_tokens=8, do_sample=True, top_p=1e-6), greedy
    )


def test_flamingo_latent_keys_and_values_are_projected_once(monkeypatch):
    model = model_for("perceiver")
    input_ids, mask, pixels = prompts(model)
    calls = {"n": 0}
    real = MultiHeadAttention.project_kv

    def counting(self, context):
        calls["n"] += 1
        return real(self, context)

    monkeypatch.setattr(MultiHeadAttention, "project_kv", counting)
    generate(model, input_ids, mask, pixels, max_new_tokens=12)
    resampler = len(model.bridge.resampler.layers)  # the resampler attends once per image set
    assert calls["n"] == resampler + len(model.bridge.blocks)  # not once per new token


def test_right_padded_prompts_are_refused():
    model = model_for("linear")
    input_ids, mask, pixels = prompts(model)
    with pytest.raises(ValueError, match="left"):
        generate(model, input_ids.flip(1), mask.flip(1), pixels)
