"""Attention masks and positions of packed rows, for the LM.

A packed row holds several samples (``sample_ids`` 0, 1, ...), and a sample may hold several
turns after a shared image prefix (``segment_ids``: 0 on the prefix, ``k`` on turn ``k``). A
token attends causally, within its own sample, to the prefix and to its own turn; its position
counts only what it sees. Each sample and turn so computes exactly what it computes alone.

One rule, two forms: a dense additive ``(B, 1, T, T)`` mask for the LM's ``sdpa`` and ``eager``
attention, or a FlexAttention ``BlockMask`` for ``flex_attention``, which skips the masked-out
blocks instead of materialising ``T x T`` (the form to use on GPUs for long packed rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vlm.attention import block_mask

#: The LM attention implementations that take a packed row's mask.
PACKED_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def packed_rule(
    segment_ids: Tensor | None, sample_ids: Tensor | None, attention_mask: Tensor | None
) -> Callable:
    """``mask_mod(b, h, q, k) -> bool``: True where query ``q`` of row ``b`` may attend to key
    ``k``. Padding queries see themselves, so no row of the mask is empty."""
    valid = attention_mask.bool() if attention_mask is not None else None

    def rule(b, h, q, k):
        allowed = k <= q
        if sample_ids is not None:
            allowed = allowed & (sample_ids[b, q] == sample_ids[b, k])
        if segment_ids is not None:
            allowed = allowed & ((segment_ids[b, k] == 0) | (segment_ids[b, k] == segment_ids[b, q]))
        if valid is not None:
            allowed = allowed & valid[b, k]
        return allowed | (q == k)

    return rule


def _run_start(ids: Tensor) -> Tensor:
    """For each position, where its run of equal ``ids`` (along the row) began."""
    T = ids.shape[1]
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    where = torch.arange(T, device=ids.device).expand_as(ids)
    return torch.where(starts, where, 0).cummax(1).values


def packed_positions(segment_ids: Tensor | None, sample_ids: Tensor | None) -> Tensor:
    """``(B, T)`` position ids: from 0 at each sample's start; a turn continues from its
    sample's prefix. Computed in ``O(T)`` (no ``T x T`` mask). Padding positions are arbitrary."""
    ids = segment_ids if segment_ids is not None else sample_ids
    T = ids.shape[1]
    t = torch.arange(T, device=ids.device).expand_as(ids)
    sample_start = _run_start(sample_ids) if sample_ids is not None else torch.zeros_like(ids)
    if segment_ids is None:
        return t - sample_start
    # Runs of (sample, segment): samples and turns are contiguous, the prefix first.
    key = segment_ids if sample_ids is None else sample_ids * (int(segment_ids.max()) + 1) + segment_ids
    run_start = _run_start(key)
    in_prefix = (segment_ids == 0).long().cumsum(1)
    prefix_before_sample = torch.gather(in_prefix - (segment_ids == 0).long(), 1, sample_start)
    prefix_length = in_prefix - prefix_before_sample  # the sample's prefix tokens up to here
    return torch.where(segment_ids == 0, t - sample_start, prefix_length + t - run_start)


def packed_mask(
    segment_ids: Tensor | None,
    sample_ids: Tensor | None,
    attention_mask: Tensor | None,
    *,
    implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Tensor]:
    """The LM's ``attention_mask`` and ``position_ids`` for packed rows: an additive
    ``(B, 1, T, T)`` mask (0 or the dtype's minimum) for ``sdpa`` / ``eager``, a ``BlockMask``
    for ``flex_attention``."""
    if implementation not in PACKED_IMPLEMENTATIONS:
        raise ValueError(
            f"packed rows (segment_ids, sample_ids) need a decoder with attn_implementation in "
            f"{PACKED_IMPLEMENTATIONS} (a 4-D or block mask), not {implementation!r}; set "
            "data.pack_turns = false and data.pack_length = 0"
        )
    ids = segment_ids if segment_ids is not None else sample_ids
    B, T = ids.shape
    rule = packed_rule(segment_ids, sample_ids, attention_mask)
    positions = packed_positions(segment_ids, sample_ids)
    if attention_mask is not None:  # padding may continue a sample past the LM's longest position
        positions = positions.masked_fill(attention_mask == 0, 0)
    if implementation == "flex_attention":
        return block_mask(rule, B, T, T, ids.device), positions
    b = torch.arange(B, device=ids.device)[:, None, None]
    q = torch.arange(T, device=ids.device)[None, :, None]
    allowed = rule(b, None, q, q.transpose(1, 2))  # (B, T, T) by broadcasting
    mask = torch.zeros(allowed.shape, dtype=dtype, device=ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None], positions
