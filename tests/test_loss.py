"""vlm's cross-entropy against torch's: the same values and gradients, ignored targets included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlm.loss
from vlm.loss import IGNORE_INDEX, cross_entropy


@pytest.fixture(autouse=True)
def two_pass_everywhere(monkeypatch):
    """The tests' logits are small: the two-pass path is taken at any size here."""
    monkeypatch.setattr(vlm.loss, "TWO_PASS_MIN_LOGITS", 0)


def _case(seed: int, rows: int = 7, vocab: int = 50, ignored: int = 2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[:ignored] = IGNORE_INDEX
    return logits, targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignored", [0, 3, 7])
def test_values_and_gradients_match_torch(reduction, ignored):
    logits, targets = _case(0, ignored=ignored)
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = cross_entropy(ours_in, targets, reduction=reduction)
    ref = F.cross_entropy(ref_in, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    torch.testing.assert_close(ours, ref, equal_nan=True)  # all ignored, mean: NaN on both sides
    (ours * 1.7).backward()  # an upstream gradient other than 1
    (ref * 1.7).backward()
    torch.testing.assert_close(ours_in.grad, torch.nan_to_num(ref_in.grad), rtol=1e-5, atol=1e-7)


def test_large_logits_stay_finite():
    logits, targets = _case(1)
    logits[:, 0] = 1e4  # an exp() of these overflows without the log-sum-exp shift
    ours_in = logits.clone().requires_grad_()
    loss = cross_entropy(ours_in, targets)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX))
    assert torch.isfinite(ours_in.grad).all()


def test_bf16_logits_are_computed_in_float32_and_get_a_bf16_gradient():
    logits, targets = _case(2, dtype=torch.bfloat16)
    logits.requires_grad_()
    loss = cross_entropy(logits, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX))


def test_bad_input_is_refused():
    logits, targets = _case(3)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, targets, reduction="none")
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        cross_entropy(logits[None], targets)
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        cross_entropy(logits, targets[:3])


def test_small_logits_go_to_torch(monkeypatch):
    monkeypatch.setattr(vlm.loss, "TWO_PASS_MIN_LOGITS", 1000)
    small, targets = _case(4, rows=4, vocab=10)
    assert cross_entropy(small.requires_grad_(), targets).grad_fn.name() == "NllLossBackward0"
    large, targets = _case(4, rows=20, vocab=100)
    assert "CrossEntropy" in cross_entropy(large.requires_grad_(), targets).grad_fn.name()
