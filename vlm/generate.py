"""Generation for every bridge kind: batched (left padding), greedy, sampling, beam search.

With the KV cache (the default) the prompt and its images are processed once; each new token
costs one LM step whatever the number of images (a Flamingo model's cross-attention keys and
values of the latents are projected once, too). ``use_cache=False`` recomputes the whole
sequence every step: the reference the cached path must match.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, StaticCache


@dataclass
class GenerationConfig:
    """How to pick the new tokens.

    Args:
        max_new_tokens: stop after this many new tokens.
        do_sample: sample (with ``temperature``, ``top_k``, ``top_p``) instead of greedy.
        num_beams: beam search when > 1 (deterministic; ignores sampling settings).
        length_penalty: beam scores are ``sum log p / length ** length_penalty``.
        eos_token_id: one id or several; a row stops at the first.
        pad_token_id: fills rows that stopped early.
        use_cache: reuse keys and values (``False`` recomputes everything each step).
        cache: ``"dynamic"`` (grows each step) or ``"static"`` (allocated once for prompt plus
            ``max_new_tokens``: fixed shapes, what ``compile`` needs).
        compile: ``torch.compile`` the LM's forward for the new-token steps (with a static
            cache). The first call compiles.
        seed: seed of the sampling generator (``None``: the global RNG).
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int = 0
    use_cache: bool = True
    cache: str = "dynamic"
    compile: bool = False
    seed: int | None = None


class _Steps:
    """Runs the LM over a growing sequence, with or without the KV cache."""

    def __init__(
        self,
        model,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None,
        config: GenerationConfig,
        image_sizes: Tensor | None = None,
    ):
        self.model, self.cache = model, config.use_cache
        self.input_ids, self.mask = input_ids, attention_mask
        self.past = None
        self.config = config
        self.step_forward = model.decoder.forward
        if config.compile:
            self.step_forward = _compiled(model.decoder, input_ids.device.type)
        # The uncached path re-reads each row's images every step; beam search reorders rows,
        # so the images are kept per row.
        self.features = model.encode_pixels(pixel_values) if pixel_values is not None else None
        self.sizes = image_sizes
        # Each row's images (their sizes' rows) and tiles (their features' rows).
        self.row_images, self.row_tiles = image_rows(model, input_ids, image_sizes)

    def _row_features(self) -> tuple[Tensor | None, Tensor | None]:
        if self.features is None:
            return None, None
        features = self.features[torch.cat(self.row_tiles).to(self.features.device)]
        return features, None if self.sizes is None else self.sizes[torch.cat(self.row_images)]

    def first(self) -> Tensor:
        if not self.cache:
            return self._full()
        embeds, _ = self.model.prepare_inputs(
            self.input_ids, image_features=self.features, image_sizes=self.sizes
        )
        self.past = self._new_cache()
        out = self.model.decoder(
            embeds,
            attention_mask=self.mask,
            position_ids=positions(self.mask),
            **{self.model.decoder.cache_argument: self.past},
            use_cache=True,
            **last_only(self.model.decoder),
        )
        return next_token_logits(self.model, out)

    def _new_cache(self):
        if self.config.cache == "static":
            length = self.input_ids.shape[1] + self.config.max_new_tokens
            return StaticCache(config=self.model.decoder.lm.config, max_cache_len=length)
        return DynamicCache()

    def _full(self) -> Tensor:
        features, sizes = self._row_features()
        embeds, _ = self.model.prepare_inputs(self.input_ids, image_features=features, image_sizes=sizes)
        out = self.model.decoder(
            embeds,
            attention_mask=self.mask,
            position_ids=positions(self.mask),
            **last_only(self.model.decoder),
        )
        return next_token_logits(self.model, out)

    def next(self, tokens: Tensor) -> Tensor:
        """Appends ``tokens`` (B,) and returns the logits for the following position."""
        self.input_ids = torch.cat([self.input_ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        if not self.cache:
            return self._full()
        out = self.step_forward(
            self.model.decoder.embed(tokens[:, None]),
            attention_mask=self.mask,
            position_ids=positions(self.mask)[:, -1:],
            **{self.model.decoder.cache_argument: self.past},
            use_cache=True,
        )
        return next_token_logits(self.model, out)

    def reorder(self, rows: Tensor) -> None:
        """Keeps rows ``rows`` (beam search), in that order."""
        self.input_ids, self.mask = self.input_ids[rows], self.mask[rows]
        self.row_images = [self.row_images[r] for r in rows.tolist()]
        self.row_tiles = [self.row_tiles[r] for r in rows.tolist()]
        self.model.bridge.select_rows(rows)
        if self.past is not None:
            self.past.reorder_cache(rows)


def image_rows(model, input_ids: Tensor, image_sizes: Tensor | None) -> tuple[list[Tensor], list[Tensor]]:
    """Which of the prompts' images (reading order) and which of their tiles each row holds,
    from its placeholders: an image of size ``s`` takes ``model.tiling.num_tokens(s)``."""
    placeholders = (input_ids == model.image_token_id).sum(1).tolist()
    if image_sizes is None:  # one tile per image, tokens_per_image each
        counts = [p // model.tokens_per_image for p in placeholders]
        tiles_of = [1] * sum(counts)
    else:
        sizes = [tuple(s) for s in image_sizes.tolist()]
        tokens = [model.tiling.num_tokens(s) for s in sizes]
        tiles_of = [model.tiling.num_tiles(s) for s in sizes]
        counts, image = [], 0
        for row, p in enumerate(placeholders):
            start = image
            while p > 0 and image < len(tokens):
                p -= tokens[image]
                image += 1
            if p != 0:
                raise ValueError(
                    f"row {row}'s image placeholders do not match its images' sizes; build the "
                    "prompts with the model's processor and the same image_sizes"
                )
            counts.append(image - start)
    images, tiles, first_image, first_tile = [], [], 0, 0
    for count in counts:
        own = sum(tiles_of[first_image : first_image + count])
        images.append(torch.arange(first_image, first_image + count))
        tiles.append(torch.arange(first_tile, first_tile + own))
        first_image, first_tile = first_image + count, first_tile + own
    return images, tiles


def positions(mask: Tensor) -> Tensor:
    """Position ids of left-padded rows ``(B, T)``: left padding does not shift positions."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def last_only(decoder) -> dict[str, int]:
    """Only the last position's logits are needed: the LM head skips the rest of the prompt."""
    return {"logits_to_keep": 1} if decoder.supports_logits_to_keep else {}


def next_token_logits(model, out) -> Tensor:
    """The last position's logits ``(B, V)`` in float32, ``<image>`` excluded (a generated
    placeholder would have no image)."""
    logits = out.logits[:, -1].float()
    logits[:, model.image_token_id] = float("-inf")
    return logits


def _compiled(decoder, device_type: str):
    """The decoder's forward, compiled once per decoder and device type."""
    cache = decoder.__dict__.setdefault("_compiled_forward", {})
    if device_type not in cache:
        # Default mode: the attention mask grows by one column per step, so CUDA graphs
        # ("reduce-overhead") would re-record at every step.
        cache[device_type] = torch.compile(decoder.forward)
    return cache[device_type]


def sample(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token ``(B,)`` drawn from each row of ``(B, V)`` logits after :func:`filter_logits`."""
    probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def filter_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus) on ``(B, V)`` logits."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the first token past p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _eos(config: GenerationConfig, device) -> Tensor:
    ids = config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return torch.tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    pixel_values: Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    image_sizes: Tensor | None = None,
    streamer: Callable[[Tensor], None] | None = None,
    **overrides,
) -> Tensor:
    """New tokens ``(B, L)`` after each (left-padded) prompt, padded after EOS.

    Args:
        model: a ``VisionLanguageModel``.
        input_ids, attention_mask: ``(B, T)`` prompts, padded on the left.
        pixel_values: ``(N_img, 3, H, W)``, the prompts' images in reading order (their tiles,
            when the model's tiling cuts them; see ``image_sizes``).
        image_sizes: ``(N_img, 2)`` each image's ``(height, width)``, for a tiling model.
        config, overrides: a :class:`GenerationConfig` and/or its fields as keywords.
        streamer: called with each step's new tokens ``(B,)`` as soon as they are chosen
            (not with beam search, whose tokens are only known at the end).
    """
    config = replace(config or GenerationConfig(), **overrides)
    if streamer is not None and config.num_beams > 1:
        raise ValueError("streaming needs num_beams = 1: beam search picks its tokens at the end")
    if config.cache not in ("dynamic", "static") or (
        config.compile and (config.cache != "static" or not config.use_cache)
    ):
        raise ValueError(
            "cache must be 'dynamic' or 'static', and compile needs cache='static' with use_cache"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask[:, -1].eq(0).any():
        raise ValueError("prompts must be padded on the left for generation (Processor.pad(side='left'))")
    was_training = model.training
    model.eval()
    try:
        if config.num_beams > 1:
            return _beam_search(model, input_ids, attention_mask, pixel_values, config, image_sizes)
        return _sample(model, input_ids, attention_mask, pixel_values, config, streamer, image_sizes)
    finally:
        model.train(was_training)
        model.bridge.release()


def _sample(
    model, input_ids, attention_mask, pixel_values, config: GenerationConfig, streamer=None, image_sizes=None
) -> Tensor:
    steps = _Steps(model, input_ids, attention_mask, pixel_values, config, image_sizes)
    eos = _eos(config, input_ids.device)
    generator = None
    if config.do_sample and config.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(config.seed)
    finished = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    new: list[Tensor] = []
    logits = steps.first()
    for step in range(config.max_new_tokens):
        if config.do_sample:
            tokens = sample(
                logits,
                temperature=config.temperature,
                top_k=config.top_k,
                top_p=config.top_p,
                generator=generator,
            )
        else:
            tokens = logits.argmax(-1)
        tokens = tokens.masked_fill(finished, config.pad_token_id)
        new.append(tokens)
        if streamer is not None:
            streamer(tokens)
        finished |= torch.isin(tokens, eos)
        if finished.all() or step == config.max_new_tokens - 1:
            break
        logits = steps.next(tokens)
    if not new:
        return input_ids.new_zeros(len(input_ids), 0)
    return torch.stack(new, dim=1)


def _beam_search(
    model, input_ids, attention_mask, pixel_values, config: GenerationConfig, image_sizes=None
) -> Tensor:
    """Beam search as transformers' ``generate(num_beams=K)`` does it (``early_stopping=False``).

    Each step ranks the continuations of a prompt's K live beams and keeps the ``2K`` best (more
    with several EOS ids). Those among the K best that end in EOS (or reach ``max_new_tokens``)
    compete for the prompt's K finished hypotheses, scored ``sum log p / length **
    length_penalty``; an EOS candidate ranked below the K best is dropped, not counted. The K
    best candidates that did not end become the live beams. A prompt is settled once it holds K
    finished hypotheses and its best live beam, scored at its current length, cannot beat the
    worst of them; the search stops when every prompt is settled.
    """
    K, B, device, limit = config.num_beams, len(input_ids), input_ids.device, config.max_new_tokens
    if limit < 1:
        return input_ids.new_zeros(B, 0)
    eos = _eos(config, device)
    width = max(2, 1 + len(eos)) * K  # enough candidates that K of them are still live
    steps = _Steps(model, input_ids, attention_mask, pixel_values, config, image_sizes)
    logits = steps.first()  # images are encoded once per prompt, then rows are repeated
    rows = torch.arange(B, device=device).repeat_interleave(K)
    steps.reorder(rows)
    logits = logits[rows]
    never = -1.0e9  # a score nothing real reaches (finite: sums and ranks stay well defined)
    live_scores = torch.full((B, K), never, device=device)
    live_scores[:, 0] = 0.0  # the K beams start identical: expand one
    live = input_ids.new_zeros(B, K, 0)  # (B, K, step): the live beams' tokens
    done = input_ids.new_full((B, K, limit), config.pad_token_id)  # finished hypotheses, padded
    done_scores = torch.full((B, K), never, device=device)
    done_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    done_filled = torch.zeros(B, K, dtype=torch.bool, device=device)
    searching = torch.ones(B, dtype=torch.bool, device=device)
    in_top_k = torch.arange(width, device=device) < K
    for step in range(limit):
        length, last = step + 1, step == limit - 1
        logprobs = logits.log_softmax(-1)
        vocab = logprobs.shape[-1]
        totals = (logprobs.view(B, K, vocab) + live_scores[..., None]).view(B, K * vocab)
        top_scores, top = totals.topk(width, dim=-1)  # (B, width), best first
        source, token = top // vocab, top % vocab
        candidates = torch.cat([_gather_beams(live, source), token[..., None]], dim=-1)
        ends = torch.isin(token, eos) | last

        # Finished hypotheses: the best K of those kept so far and this step's endings.
        joining = ends & in_top_k & searching[:, None]
        scores = (top_scores / length**config.length_penalty).masked_fill(~joining, never)
        endings = F.pad(candidates, (0, limit - length), value=config.pad_token_id)
        pool_scores = torch.cat([done_scores, scores], dim=1)
        pool_filled = torch.cat([done_filled, joining], dim=1)
        best = pool_scores.masked_fill(~pool_filled, 2 * never).topk(K, dim=-1).indices
        done = _gather_beams(torch.cat([done, endings], dim=1), best)
        lengths = torch.cat([done_lengths, torch.full_like(top, length)], dim=1)
        done_lengths = lengths.gather(1, best)
        done_scores, done_filled = pool_scores.gather(1, best), pool_filled.gather(1, best)

        # Live beams: the best K candidates that did not end.
        open_scores = top_scores.masked_fill(ends, never)
        order = open_scores.topk(K, dim=-1).indices
        live_scores, live = open_scores.gather(1, order), _gather_beams(candidates, order)
        worst_done = done_scores.masked_fill(~done_filled, never).min(dim=1).values
        can_improve = live_scores[:, 0] / length**config.length_penalty > worst_done
        searching &= ~done_filled.all(dim=1) | can_improve
        if last or not searching.any():
            break
        parents = source.gather(1, order) + torch.arange(B, device=device)[:, None] * K
        steps.reorder(parents.flatten())
        logits = steps.next(live[..., -1].flatten())
    return done[:, 0, : int(done_lengths[:, 0].max())]  # each prompt's best finished hypothesis


def _gather_beams(tokens: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` (B, N) of each prompt's ``tokens`` (B, M, L): ``(B, N, L)``."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
