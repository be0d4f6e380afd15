"""Continuous batching: rows that join a running batch, and leave it, get generate()'s tokens."""

import pytest
import tiny
import torch
from test_generate import model_for

from vlm.engine import BatchedGeneration, Request
from vlm.generate import generate

EOS = 2


def random_prompts(model, count, seed=0):
    """Prompts of different lengths, with 0, 1 or 2 images placed among the text."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        ids = []
        images = i % 3
        for _ in range(images):
            ids += [model.image_token_id] * model.tokens_per_image + [
                int(torch.randint(3, tiny.VOCAB, (1,), generator=g))
            ]
        ids += torch.randint(3, tiny.VOCAB, (2 + 3 * i % 7,), generator=g).tolist()
        pixels = torch.randn(images, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, generator=g) if images else None
        out.append((ids, pixels))
    return out


def alone(model, ids, pixels, max_new_tokens):
    """What generate() gives this prompt by itself (greedy), cut after EOS."""
    new = generate(model, torch.tensor([ids]), None, pixels, max_new_tokens=max_new_tokens, eos_token_id=EOS)[
        0
    ].tolist()
    return new[: new.index(EOS)] if EOS in new else new


def collect(ids, pixels, max_new_tokens, **settings):
    tokens, finished = [], []
    request = Request(
        ids,
        pixels,
        max_new_tokens=max_new_tokens,
        on_token=lambda t: tokens.append(t) is None,
        on_finish=lambda reason, error: finished.append((reason, error)),
        **settings,
    )
    return request, tokens, finished


@pytest.mark.parametrize("decoder", ["llama", "gpt2"])
@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_rows_joining_a_running_batch_get_the_tokens_they_get_alone(bridge, decoder):
    model = model_for(bridge, decoder)
    prompts = random_prompts(model, 6)
    budgets = [9, 3, 12, 5, 8, 1]
    batch = BatchedGeneration(model, eos_token_id=EOS, pad_token_id=0)
    results = [collect(ids, pixels, n) for (ids, pixels), n in zip(prompts, budgets)]
    # Two start together; one joins at each of the next steps while others finish and leave.
    batch.admit([results[0][0], results[1][0]])
    for request, _, _ in results[2:]:
        batch.step()
        batch.admit([request])
    while len(batch):
        batch.step()
    for ((ids, pixels), n), (_, tokens, finished) in zip(zip(prompts, budgets), results):
        expected = alone(model, ids, pixels, n)
        assert tokens == expected
        assert finished == [("length" if len(expected) == n else "stop", None)]
    assert batch.cache is None and batch.mask is None  # everything left: nothing held


def test_a_row_leaving_trims_the_columns_only_it_used():
    model = model_for("linear")
    (long_ids, _), (short_ids, _) = [(list(range(3, 40)), None), (list(range(3, 8)), None)]
    batch = BatchedGeneration(model, eos_token_id=None, pad_token_id=0)
    batch.admit([collect(long_ids, None, 2)[0], collect(short_ids, None, 6)[0]])
    assert batch.mask.shape == (2, len(long_ids))
    batch.step()  # the long prompt's second token: it leaves
    assert len(batch) == 1 and batch.mask.shape[1] == len(short_ids) + 1
    assert batch.mask.all() and batch.cache.get_seq_length() == len(short_ids) + 1


def test_stop_from_the_caller_and_cancel_free_the_row():
    model = model_for("mlp2x_gelu")
    (ids, pixels), (ids2, pixels2) = random_prompts(model, 2)
    seen = []
    stopper = Request(
        ids, pixels, max_new_tokens=20, on_token=lambda t: len(seen) < 2 and seen.append(t) is None
    )
    stopped = []
    stopper.on_finish = lambda reason, error: stopped.append(reason)
    cancelled, _, finished = collect(ids2, pixels2, 20)
    batch = BatchedGeneration(model, eos_token_id=None, pad_token_id=0)
    batch.admit([stopper, cancelled])
    batch.step()
    cancelled.cancelled = True
    batch.step()
    batch.step()
    assert stopped == ["stop"] and finished == [("cancelled", None)] and len(batch) == 0


def test_a_failing_request_fails_alone():
    """Input that breaks the forward pass (here an image the prompt has no placeholders for)
    fails its own request; the others in its prefill generate as usual."""
    model = model_for("mlp2x_gelu")
    (ids, pixels), (ids2, pixels2) = random_prompts(model, 2)
    good, tokens, finished = collect(ids2, pixels2, 4)
    bad, _, bad_finished = collect([5, 6, 7], torch.randn(1, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE), 4)
    batch = BatchedGeneration(model, eos_token_id=EOS, pad_token_id=0)
    batch.admit([bad, good])
    while len(batch):
        batch.step()
    assert bad_finished[0][0] == "error" and "placeholder" in str(bad_finished[0][1])
    assert tokens == alone(model, ids2, pixels2, 4) and finished[0][0] in ("length", "stop")


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = model_for("linear")
    (ids, _), (ids2, _) = [(list(range(3, 12)), None), (list(range(20, 25)), None)]

    def sampled(with_other: bool):
        request, tokens, _ = collect(ids, None, 8, temperature=1.0, seed=7)
        batch = BatchedGeneration(model, eos_token_id=None, pad_token_id=0)
        batch.admit([request] + ([collect(ids2, None, 8, temperature=1.0, seed=1)[0]] if with_other else []))
        while len(batch):
            batch.step()
        return tokens

    assert sampled(False) == sampled(True)
    assert sampled(False) != alone(model, ids, None, 8)  # it did sample
