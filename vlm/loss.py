"""The training loss: token cross-entropy in two passes over the logits instead of five.

``F.cross_entropy`` writes the log-probabilities (a second vocabulary-sized tensor), then in
backward a zero-filled gradient for the NLL and the log-softmax gradient (two more). Here the
forward keeps only each row's log-sum-exp, and the backward writes the gradient once:
``softmax(logits) - onehot(target)``, scaled, computed from the saved logits and log-sum-exp.
Over a 32 000-token vocabulary that halves the loss's cost (``vlm bench``'s loss row;
``tests/test_loss.py`` checks values and gradients against ``F.cross_entropy``). Small logit
tensors go to ``F.cross_entropy``, which is faster there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # label of positions that do not count in the loss

#: Below this many logits ``F.cross_entropy`` is faster: the saved passes are worth less than the
#: Python autograd function's overhead (about 0.2 ms on a CPU).
TWO_PASS_MIN_LOGITS = 1 << 20


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, mean: bool) -> Tensor:
        valid = targets != IGNORE_INDEX
        picked = targets.clamp(min=0)
        lse = torch.logsumexp(logits, dim=-1)
        losses = (lse - logits.gather(1, picked[:, None]).squeeze(1)).masked_fill(~valid, 0.0)
        count = valid.sum()
        ctx.save_for_backward(logits, lse, picked, valid, count)
        ctx.mean = mean
        return losses.sum() / count if mean else losses.sum()  # 0 / 0: NaN, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, lse, picked, valid, count = ctx.saved_tensors
        grad = (logits - lse[:, None]).exp_()  # softmax, written once
        grad[torch.arange(len(picked), device=grad.device), picked] -= 1
        scale = grad_out / count.clamp(min=1) if ctx.mean else grad_out
        grad.mul_(torch.where(valid, scale, torch.zeros_like(scale))[:, None])
        return grad, None, None


def cross_entropy(logits: Tensor, targets: Tensor, *, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``(N, V)`` logits against ``(N,)`` targets, skipping ``-100``; ``"mean"``
    over the counted targets or ``"sum"``. Computed in float32 whatever the logits' dtype."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"logits (N, V) and targets (N,) expected, got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if logits.numel() < TWO_PASS_MIN_LOGITS:
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    return _CrossEntropy.apply(logits.float(), targets, reduction == "mean")
