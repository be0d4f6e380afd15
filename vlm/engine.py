"""Continuous batching: generations that join and leave a running batch between steps.

:func:`vlm.generate` runs a fixed batch until its longest row ends. A server cannot wait for
that: :class:`BatchedGeneration` keeps the rows now generating, with their KV cache, and
between two steps

- :meth:`~BatchedGeneration.admit` encodes new prompts (their images too) in one prefill and
  joins their caches to the batch's: the shorter side is padded on the left, as generation
  pads prompts, so every row keeps its own positions;
- finished rows (end of sequence, their token budget, or their caller said stop) leave at
  once, so their slots are free for the next admitted prompt.

Each row samples with its own settings and seed. A prompt's tokens do not depend on what
else is in the batch, up to float rounding in batched matrix products.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache

from vlm.generate import last_only, next_token_logits, positions, sample

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One generation: a prompt, how to continue it, and where its tokens go.

    Args:
        input_ids: the prompt, with the image placeholders where the images go.
        pixel_values: ``(n_img, 3, H, W)``, the prompt's images in reading order (their tiles,
            for a model that tiles them).
        image_sizes: ``(n_img, 2)`` each image's ``(height, width)``, for a model that tiles them.
        max_new_tokens: stop after this many new tokens (``finish_reason`` ``"length"``).
        temperature: 0 picks the most likely token (greedy); above 0 samples.
        top_p: nucleus sampling's probability mass.
        seed: seeds this row's sampling generator (``None``: the global RNG).
        on_token: called with each new token (not the end-of-sequence token); returning
            ``False`` ends the row (a stop string was found).
        on_finish: called once with ``"stop"``, ``"length"``, ``"cancelled"``, or ``"error"``
            and the exception.
    """

    input_ids: list[int]
    pixel_values: Tensor | None = None
    image_sizes: Tensor | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    on_token: Callable[[int], bool] = lambda token: True
    on_finish: Callable[[str, BaseException | None], None] = lambda reason, error: None
    cancelled: bool = False  # set from another thread: the row leaves before the next step
    generated: int = field(default=0, init=False)
    last: int = field(default=0, init=False)  # the latest token, the next step's input
    generator: torch.Generator | None = field(default=None, init=False, repr=False)


class BatchedGeneration:
    """The rows generating now, their KV cache and their attention mask.

    Args:
        model: a ``VisionLanguageModel`` (in eval mode).
        eos_token_id: one id or several; a row ends at the first.
        pad_token_id: fills the left of shorter prompts.
    """

    def __init__(self, model, *, eos_token_id: int | list[int] | None, pad_token_id: int):
        self.model, self.pad = model, pad_token_id
        ids = (
            [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        )
        self.eos = set(ids)
        self.rows: list[Request] = []
        self.cache: DynamicCache | None = None
        self.mask: Tensor | None = None  # (B, T): 1 where a row has a token
        self.media = None  # what the bridge keeps for the rows' new-token steps
        self.device = next(model.parameters()).device

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def admit(self, requests: list[Request]) -> None:
        """Prefills ``requests`` together, picks their first tokens and joins them to the batch.
        If that fails, each is tried alone, so only the request at fault fails."""
        requests = [r for r in requests if not self._cancel_if_asked(r)]
        if not requests:
            return
        try:
            self._admit(requests)
        except Exception as error:
            if len(requests) == 1:
                log.exception("generation failed")
                requests[0].on_finish("error", error)
                return
            for request in requests:
                self.admit([request])

    def _admit(self, requests: list[Request]) -> None:
        width = max(len(r.input_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):  # padded on the left, as generate() pads
            ids[i, width - len(r.input_ids) :] = torch.tensor(r.input_ids)
            mask[i, width - len(r.input_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pixels = [r.pixel_values for r in requests if r.pixel_values is not None]
        features = self.model.encode_pixels(torch.cat(pixels).to(self.device)) if pixels else None
        sized = [r.image_sizes for r in requests if r.image_sizes is not None]
        sizes = torch.cat(sized) if sized else None
        bridge = self.model.bridge
        try:
            embeds, _ = self.model.prepare_inputs(ids, image_features=features, image_sizes=sizes)
            cache = DynamicCache()
            out = self.model.decoder(
                embeds,
                attention_mask=mask,
                position_ids=positions(mask),
                **{self.model.decoder.cache_argument: cache},
                use_cache=True,
                **last_only(self.model.decoder),
            )
            media = bridge.take_rows()
        finally:
            bridge.release()
        for r in requests:
            if r.seed is not None and r.temperature > 0:
                r.generator = torch.Generator(device=self.device).manual_seed(r.seed)
        tokens = self._pick(next_token_logits(self.model, out), requests)
        first = len(self.rows)
        self._join(requests, cache, mask, media)
        self._advance(tokens, first)

    @torch.no_grad()
    def step(self) -> None:
        """One new token for every row (rows cancelled since the last step leave first)."""
        self._drop([i for i, r in enumerate(self.rows) if self._cancel_if_asked(r)])
        if not self.rows:
            return
        last = torch.tensor([r.last for r in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.model.bridge.give_rows([self.media], [len(self.rows)])
        try:
            out = self.model.decoder(
                self.model.decoder.embed(last[:, None]),
                attention_mask=self.mask,
                position_ids=positions(self.mask)[:, -1:],
                **{self.model.decoder.cache_argument: self.cache},
                use_cache=True,
            )
        except Exception as error:  # nothing tells which row is at fault: all of them fail
            log.exception("generation step failed")
            for r in self.rows:
                r.on_finish("error", error)
            self._reset()
            return
        finally:
            self.model.bridge.release()
        self._advance(self._pick(next_token_logits(self.model, out), self.rows))

    def _cancel_if_asked(self, request: Request) -> bool:
        if request.cancelled:
            request.on_finish("cancelled", None)
        return request.cancelled

    def _pick(self, logits: Tensor, requests: list[Request]) -> list[int]:
        greedy = logits.argmax(-1).tolist()
        tokens = []
        for i, r in enumerate(requests):
            if r.temperature <= 0:
                tokens.append(greedy[i])
                continue
            row = logits[i : i + 1]
            tokens.append(int(sample(row, temperature=r.temperature, top_p=r.top_p, generator=r.generator)))
        return tokens

    def _advance(self, tokens: list[int], first: int = 0) -> None:
        """Hands rows ``first``, ``first + 1``... their tokens, then lets the rows that are done
        leave."""
        done = []
        for i, (r, token) in enumerate(zip(self.rows[first:], tokens), first):
            r.last, r.generated = token, r.generated + 1
            reason = None
            if token in self.eos:
                reason = "stop"
            else:
                try:
                    if r.on_token(token) is False:
                        reason = "stop"
                except Exception as error:  # the caller's callback: its row fails, not the batch
                    log.exception("on_token failed")
                    r.on_finish("error", error)
                    done.append(i)
                    continue
                if reason is None and r.generated >= r.max_new_tokens:
                    reason = "length"
            if reason is not None:
                r.on_finish(reason, None)
                done.append(i)
        self._drop(done)

    def _join(self, requests: list[Request], cache: DynamicCache, mask: Tensor, media) -> None:
        if self.rows:
            width = max(self.mask.shape[1], mask.shape[1])
            cache = _new_cache(
                (
                    torch.cat([_pad_left(k0, width, 2), _pad_left(k1, width, 2)]),
                    torch.cat([_pad_left(v0, width, 2), _pad_left(v1, width, 2)]),
                )
                for (k0, v0), (k1, v1) in zip(_layers(self.cache), _layers(cache))
            )
            mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
            self._set_media([self.media, media], [len(self.rows), len(requests)])
        else:
            self._set_media([media], [len(requests)])
        self.rows, self.cache, self.mask = self.rows + requests, cache, mask

    def _set_media(self, parts: list, rows: list[int]) -> None:
        bridge = self.model.bridge
        bridge.give_rows(parts, rows)
        self.media = bridge.take_rows()

    def _drop(self, rows: list[int]) -> None:
        """Removes rows ``rows`` from the batch, and the left columns only they still used."""
        if not rows:
            return
        keep = [i for i in range(len(self.rows)) if i not in set(rows)]
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self.device)
        bridge = self.model.bridge
        bridge.give_rows([self.media], [len(self.rows)])
        bridge.select_rows(index)
        self.media = bridge.take_rows()
        self.rows, self.mask = [self.rows[i] for i in keep], self.mask[index]
        empty = int((self.mask.cumsum(1) == 0).sum(1).min())
        self.cache = _new_cache((k[index, :, empty:], v[index, :, empty:]) for k, v in _layers(self.cache))
        self.mask = self.mask[:, empty:]

    def _reset(self) -> None:
        self.rows, self.cache, self.mask, self.media = [], None, None, None


def _new_cache(layers) -> DynamicCache:
    cache = DynamicCache()
    for i, (keys, values) in enumerate(layers):
        cache.update(keys, values, i)
    return cache


def _layers(cache: DynamicCache) -> list[tuple[Tensor, Tensor]]:
    """Each layer's ``(keys, values)``, ``(B, heads, T, head_dim)``."""
    layers = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, Tensor) or keys.ndim != 4:
            raise NotImplementedError(
                f"continuous batching needs full-attention KV caches; this LM's cache has a "
                f"{type(layer).__name__} layer (serve it with a batch size of 1)"
            )
        layers.append((keys, values))
    return layers


def _pad_left(x: Tensor, width: int, dim: int) -> Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
