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


def run_starts(*ids: Tensor) -> Tensor:
    """``(B, T)``: for each position, where its run began: the last position at or before it
    where any of the ``(B, T)`` ``ids`` changed value along the row."""
    starts = torch.zeros_like(ids[0], dtype=torch.bool)
    starts[:, 0] = True
    for tensor in ids:
        starts[:, 1:] |= tensor[:, 1:] != tensor[:, :-1]
    where = torch.arange(starts.shape[1], device=starts.device).expand_as(starts)
    return torch.where(starts, where, 0).cummax(1).values


def packed_positions(segment_ids: Tensor | None, sample_ids: Tensor | None) -> Tensor:
    """``(B, T)`` position ids: from 0 at each sample's start; a turn continues from its
    sample's prefix. Computed in ``O(T)`` (no ``T x T`` mask). Padding positions are arbitrary."""
    ids = segment_ids if segment_ids is not None else sample_ids
    t = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    sample_start = run_starts(sample_ids) if sample_ids is not None else torch.zeros_like(ids)
    if segment_ids is None:
        return t - sample_start
    # Samples and their turns are contiguous runs, each sample's prefix (segment 0) first.
    turn_start = run_starts(segment_ids) if sample_ids is None else run_starts(sample_ids, segment_ids)
    in_prefix = (segment_ids == 0).long()
    prefix_so_far = in_prefix.cumsum(1)
    prefix_length = prefix_so_far - (prefix_so_far - in_prefix).gather(1, sample_start)
    return torch.where(segment_ids == 0, t - sample_start, prefix_length + t - turn_start)


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
