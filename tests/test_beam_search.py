"""Beam search returns what transformers' ``generate(num_beams=K)`` returns, and on a trained model
never a sequence the model finds less likely than greedy's (issue 25: an end-of-sequence candidate
from outside the live beams used to count as finished and stop the search early)."""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from transformers import LogitsProcessorList

import vlm
from vlm.convert import FORMATS, IMAGE_TOKEN_ID
from vlm.convert.registry import probe_images
from vlm.eval import bench
from vlm.generate import generate

TINY = bench.SIZES["tiny"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each registered format saved by transformers: ``name -> (directory, transformers model)``."""
    torch.manual_seed(0)
    return {
        name: (path, fmt.save_reference(TINY, path, image_token_id=IMAGE_TOKEN_ID).eval())
        for name, fmt in FORMATS.items()
        for path in [tmp_path_factory.mktemp(name)]
    }


def _prompts(name: str, model, rows: int = 2):
    """One image (its tiles where ``model`` tiles images) and a little text per row, in vlm's
    layout and in transformers'."""
    g = torch.Generator().manual_seed(3)
    text = torch.randint(5, 90, (rows, 4), generator=g)
    images, placeholders = probe_images(model, rows, generator=g)
    ids = torch.cat([text[:, :1], torch.full((rows, placeholders), IMAGE_TOKEN_ID), text[:, 1:]], dim=1)
    ours = dict(input_ids=ids, **images, attention_mask=torch.ones_like(ids))
    return FORMATS[name].hf_inputs(ours, IMAGE_TOKEN_ID), ours


def _never_image(input_ids, scores):
    """vlm never generates ``<image>`` and renormalises without it; transformers' beam search
    applies processors to log-probabilities, so this is the same distribution."""
    scores = scores.clone()
    scores[:, IMAGE_TOKEN_ID] = float("-inf")
    return scores.log_softmax(-1)


def _until_eos(row: list[int], eos: list[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


@pytest.mark.parametrize("name", list(FORMATS))
def test_beam_search_equals_transformers_generate(checkpoints, name):
    path, hf_model = checkpoints[name]
    model = vlm.from_pretrained(path).eval()
    hf_inputs, inputs = _prompts(name, model)
    prompt = hf_inputs["input_ids"].shape[1]
    greedy = generate(model, **inputs, max_new_tokens=12)
    # End-of-sequence ids the model does emit, so hypotheses finish at different lengths and
    # candidates ending below the K best turn up (the case the old search got wrong).
    eos_choices = [
        [int(greedy[0, 2])],
        [int(greedy[1, 4]), int(greedy[0, 6])],
        [int(greedy[0, 1]), int(greedy[1, 3]), int(greedy[1, 7])],
    ]
    compared = 0
    for eos in eos_choices:
        for beams, penalty in [(2, 1.0), (3, 0.0), (4, 2.0)]:
            options = dict(max_new_tokens=10, num_beams=beams, length_penalty=penalty)
            with torch.no_grad():
                expected = hf_model.generate(
                    **hf_inputs,
                    **options,
                    do_sample=False,
                    early_stopping=False,
                    eos_token_id=eos,
                    pad_token_id=0,
                    logits_processor=LogitsProcessorList([_never_image]),
                )[:, prompt:]
            got = generate(model, **inputs, **options, eos_token_id=eos, pad_token_id=0)
            for row in range(len(got)):
                want = _until_eos(expected[row].tolist(), eos)
                assert _until_eos(got[row].tolist(), eos) == want, (eos, beams, penalty, row)
                compared += any(t in eos for t in want)
    assert compared >= 6, "too few hypotheses ended in EOS for the comparison to test finishing"


# A bigram language model set by hand: each token's logits depend on the previous token alone
# (every layer's output projections zeroed, one-hot embeddings, the LM head holding the table).
# It replays the demo's caption from issue 25: greedy reads "a red square on the left"; after
# "square", "left" and the end of sequence are unlikely continuations.
P, A, RED, SQUARE, ON, THE, LEFT, EOS = 9, 10, 11, 12, 13, 14, 15, 2
BIGRAMS = {
    P: {A: 1.0},
    A: {RED: 1.0},
    RED: {SQUARE: 1.0},
    SQUARE: {ON: 0.9, EOS: 0.06, LEFT: 0.04},
    ON: {THE: 1.0},
    THE: {LEFT: 1.0},
    LEFT: {EOS: 1.0},
}


def bigram_model():
    model = vlm.build_model(tiny.model_config("vit", "linear", "llama")).eval()
    lm = model.decoder.lm
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()  # every layer adds nothing to the residual stream
        embed, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
        embed.zero_()
        eps, width = lm.config.rms_norm_eps, embed.shape[1]
        scale = (1 / width + eps) ** -0.5  # what the final RMSNorm multiplies a one-hot row by
        head.fill_(-20.0 / scale)  # tokens off the table: about e^-20 each
        for slot, (previous, following) in enumerate(BIGRAMS.items()):
            embed[previous, slot] = 1.0
            for token, prob in following.items():
                head[token, slot] = math.log(prob) / scale
    return model


def test_beam_search_keeps_searching_until_no_live_beam_can_win():
    """With two beams, "a red square" + end and then "a red square left" + end finish first; the
    old search stopped once two had finished and returned the second (log p -3.2) over
    greedy's sentence (log p -0.1), whose live beam still scored better than both."""
    model = bigram_model()
    prompt = torch.tensor([[P]])
    options = dict(max_new_tokens=10, eos_token_id=EOS, pad_token_id=0)
    greedy = generate(model, prompt, **options)
    assert greedy[0].tolist() == [A, RED, SQUARE, ON, THE, LEFT, EOS]
    for beams in (2, 3):
        assert generate(model, prompt, **options, num_beams=beams).tolist() == greedy.tolist(), beams
        with torch.no_grad():
            expected = tiny.bare_lm(model).generate(prompt, **options, num_beams=beams, do_sample=False)
        assert expected[0, 1:].tolist() == greedy[0].tolist(), beams
