"""The bridge contract: how a bridge receives image features and conditions the LM.

The model and generation code talk to every bridge through :class:`Bridge` alone:

- ``forward(features)`` maps the encoder's features ``(N_img, N, Dv)`` to the bridge's
  per-image output ("visual": tokens, queries or latents);
- ``attach(decoder)`` runs once, when the model is assembled;
- ``condition(embeds, visual, image_positions)`` conditions one LM call (or one generation)
  on the batch's images and returns the LM's input embeddings;
- ``select_rows(rows)`` follows the batch when generation repeats or reorders its rows
  (beam search), and ``release()`` drops whatever ``condition`` left behind;
- ``take_rows()`` and ``give_rows(parts, rows)`` hand that over, so that prompts conditioned
  apart generate together (continuous batching, ``vlm.engine``).

Two kinds implement it:

- :class:`PrefixBridge` (linear, MLP, Q-Former): the visual tokens take the places of the
  ``<image>`` placeholders in the input embeddings; nothing is left behind.
- :class:`CrossAttentionBridge` (Flamingo's perceiver): blocks hooked before some LM layers
  attend to each image's latents; ``condition`` keeps the latents as the batch's
  :class:`Media` until ``release``. One ``<image>`` token marks where each image sits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vlm.packing import run_starts


class Bridge(nn.Module):
    """Connects an image encoder to a language decoder."""

    #: Whether its output tokens take the images' placeholders in the text (prefix bridges):
    #: the tiling then arranges an image's tiles into them. Otherwise the bridge gets each
    #: tile's output and each image's tile count (``condition(..., tiles=...)``).
    tokens_in_text = True

    def tokens_per_image(self, num_features: int) -> int:
        """Placeholders one image takes in ``input_ids`` given ``num_features`` encoder tokens."""
        raise NotImplementedError

    def token_grid(self, num_features: int) -> tuple[int, int] | None:
        """One image's output tokens as a row-major ``(rows, cols)`` grid of the picture, or
        ``None`` when they are not spatial (queries, latents): tilings that lay tiles out in
        space (AnyRes) need one."""
        return None

    def forward(self, features: Tensor) -> Tensor:
        """``(N_img, N, Dv)`` image features to the bridge's output for each image."""
        raise NotImplementedError

    def attach(self, decoder: nn.Module) -> None:
        """Called once by the model with its decoder (cross-attention bridges hook its layers)."""

    def condition(
        self,
        embeds: Tensor,
        visual: Tensor | None,
        image_positions: Tensor,
        sample_ids: Tensor | None = None,
        tiles: Tensor | None = None,
    ) -> Tensor:
        """The LM's input embeddings for the next LM call(s), conditioned on the images.

        Args:
            embeds: ``(B, T, D_lm)`` token embeddings, placeholders included.
            visual: ``(N_img, ...)`` this bridge's output for the batch's images in reading
                order (row by row); ``None`` for a text-only batch.
            image_positions: ``(B, T)`` bool, True at the image placeholders.
            sample_ids: ``(B, T)`` for rows packing several samples (see ``Processor.pack``):
                a token sees no image of another sample.
            tiles: ``(N_img,)`` how many of ``visual``'s entries (tiles) each image has, for a
                bridge whose tokens are not in the text (``tokens_in_text = False``); ``None``:
                one each.
        """
        raise NotImplementedError

    def condition_from_mask(self, embeds: Tensor, visual: Tensor, image_attention_mask: Tensor) -> Tensor:
        """As :meth:`condition`, with the images given as IDEFICS does: ``visual`` ``(B, n_img, ...)``
        per row and ``image_attention_mask`` ``(B, T, n_img)``, the image each token attends to."""
        raise ValueError(
            f"image_attention_mask is for cross-attention (Flamingo / IDEFICS) bridges, not "
            f"{type(self).__name__}; put the image placeholders in input_ids instead"
        )

    def select_rows(self, rows: Tensor) -> None:
        """Keeps the conditioned rows ``rows`` (B',) in that order: generation repeats each
        prompt's row for its beams and reorders the beams."""

    def release(self) -> None:
        """Drops what :meth:`condition` keeps for the LM calls that follow."""

    def take_rows(self) -> Any:
        """What :meth:`condition` keeps for the new-token steps, handed to the caller (and no
        longer kept here); ``None`` when nothing is kept."""
        return None

    def give_rows(self, parts: list[Any], rows: list[int]) -> None:
        """Conditions the new-token steps on ``parts`` (from :meth:`take_rows`) stacked in this
        order; part ``i`` covers ``rows[i]`` rows of the batch."""


class PrefixBridge(Bridge):
    """A bridge whose output tokens replace the ``<image>`` placeholders; it keeps no state."""

    def condition(self, embeds, visual, image_positions, sample_ids=None, tiles=None):
        if visual is None:
            return embeds
        return embeds.masked_scatter(image_positions.unsqueeze(-1), visual.to(embeds.dtype))


@dataclass
class Media:
    """The images a batch attends to from inside the LM.

    ``latents`` ``(B, n_img, M, D)``, each row's images (zeros past a row's last one), or their
    tiles: an image cut into tiles is several entries in a row;
    ``index`` ``(B, T)``: the 1-based number of the latest entry at or before each token (0:
    none yet); ``first`` ``(B, T)``: the first entry of that image (``None``: one entry per
    image), so that a token attends to entries ``first .. index``. New tokens of a cached
    generation (fewer than ``T``) take the last column: the latest image. ``cache`` is for the
    blocks (projected keys and values, masks), and follows the rows through :meth:`select`.
    """

    latents: Tensor
    index: Tensor
    cache: dict[Any, Any] = field(default_factory=dict)
    first: Tensor | None = None

    def select(self, rows: Tensor) -> Media:
        """These rows only, in this order; cached tensors whose first dimension is the batch
        follow them, anything else (built for the old rows) is dropped."""
        B = self.latents.shape[0]
        cache = {}
        for key, value in self.cache.items():
            if isinstance(value, tuple) and all(isinstance(t, Tensor) and t.shape[0] == B for t in value):
                cache[key] = tuple(t[rows] for t in value)
        first = None if self.first is None else self.first[rows]
        return Media(self.latents[rows], self.index[rows], cache, first)

    @staticmethod
    def stack(parts: list[Media | None], rows: list[int]) -> Media | None:
        """The media of batches put one under the other, for new-token steps only: each row keeps
        its latest image (the last column of ``index``); ``None`` parts (text-only batches) see
        no image. The blocks' cache is rebuilt at the next step."""
        known = [p for p in parts if p is not None]
        if not known:
            return None
        if len(parts) == 1:
            return parts[0]  # its blocks' cache still holds
        n_img = max(p.latents.shape[1] for p in known)
        like = known[0].latents
        latents, index, first = [], [], []
        for part, count in zip(parts, rows):
            if part is None:
                latents.append(like.new_zeros(count, n_img, *like.shape[2:]))
                index.append(torch.zeros(count, 1, dtype=torch.long, device=like.device))
                first.append(index[-1])
                continue
            pad = n_img - part.latents.shape[1]
            latents.append(torch.cat([part.latents, part.latents.new_zeros(count, pad, *like.shape[2:])], 1))
            index.append(part.index[:, -1:])
            first.append(index[-1] if part.first is None else part.first[:, -1:])
        tiled = any(p is not None and p.first is not None for p in parts)
        return Media(torch.cat(latents), torch.cat(index), first=torch.cat(first) if tiled else None)


class CrossAttentionBridge(Bridge):
    """A bridge whose ``blocks`` run before LM layers and attend to the batch's :class:`Media`.

    Subclasses fill ``self.blocks``, an ``nn.ModuleDict`` from an LM layer's number (as a
    string) to a module ``block(hidden_states, media) -> hidden_states``; ``media`` is ``None``
    for a text-only batch. They need one placeholder per image.
    """

    blocks: nn.ModuleDict
    tokens_in_text = False  # one <image> marker per image; its tiles are its media

    def __init__(self) -> None:
        super().__init__()
        self._media: Media | None = None

    def tokens_per_image(self, num_features: int) -> int:
        return 1  # the <image> token marks where an image sits in the text

    def attach(self, decoder: nn.Module) -> None:
        layers = decoder.layers()
        for i, block in self.blocks.items():
            layers[int(i)].register_forward_pre_hook(self._hook(block), with_kwargs=True)

    def _hook(self, block: nn.Module):
        def before_layer(module, args, kwargs):
            if args:
                return (block(args[0], self._media), *args[1:]), kwargs
            kwargs["hidden_states"] = block(kwargs["hidden_states"], self._media)
            return args, kwargs

        return before_layer

    def condition(self, embeds, visual, image_positions, sample_ids=None, tiles=None):
        self._media = None if visual is None else media_at(visual, image_positions, sample_ids, tiles)
        return embeds

    def condition_from_mask(self, embeds, visual, image_attention_mask):
        if image_attention_mask.shape[-1] != visual.shape[1]:
            raise ValueError(
                f"image_attention_mask has {image_attention_mask.shape[-1]} image columns but "
                f"{visual.shape[1]} images per row were given"
            )
        seen = image_attention_mask.bool()
        if (seen.sum(-1) > 1).any():
            raise ValueError(
                "image_attention_mask lets a token attend to several images; vlm attends to the most "
                "recent image only (build the mask with only the latest image per token)"
            )
        self._media = Media(visual, torch.where(seen.any(-1), seen.long().argmax(-1) + 1, 0))
        return embeds

    def select_rows(self, rows: Tensor) -> None:
        if self._media is not None:
            self._media = self._media.select(rows)

    def release(self) -> None:
        self._media = None

    def take_rows(self) -> Media | None:
        media, self._media = self._media, None
        return media

    def give_rows(self, parts: list[Media | None], rows: list[int]) -> None:
        self._media = Media.stack(parts, rows)


def media_at(
    visual: Tensor, image_positions: Tensor, sample_ids: Tensor | None = None, tiles: Tensor | None = None
) -> Media:
    """The :class:`Media` of images ``visual`` ``(N_img, M, D)`` (reading order) placed at
    ``image_positions`` ``(B, T)``; with ``tiles`` ``(N_img,)``, ``visual`` holds each image's
    tiles one after another, and a token attends to all of its latest image's tiles. With
    ``sample_ids``, a token sees no image of an earlier sample packed in its row."""
    marks = image_positions.long()
    per_mark = marks if tiles is None else marks.masked_scatter(image_positions, tiles.to(marks))
    counts = per_mark.sum(1)  # entries per row
    n_max = max(int(counts.max()), 1)
    latents = visual.new_zeros(image_positions.shape[0], n_max, *visual.shape[1:])
    latents[torch.arange(n_max, device=counts.device)[None] < counts[:, None]] = visual
    index = per_mark.cumsum(1)
    first = None
    if tiles is not None:  # the entries of the latest image: index - its tiles + 1 .. index
        latest = marks.cumsum(1)  # 1-based number of the row's latest image
        images = marks.sum(1)
        own = torch.zeros(len(counts), int(images.max()) + 1, dtype=torch.long, device=marks.device)
        slots = torch.arange(1, own.shape[1], device=marks.device)[None] <= images[:, None]
        own[:, 1:][slots] = tiles.to(marks)  # own[b, k]: tiles of row b's k-th image
        first = index - own.gather(1, latest) + 1
    if sample_ids is not None:  # images counted before the token's sample began are not its own
        earlier = (index - per_mark).gather(1, run_starts(sample_ids))
        index = torch.where(index > earlier, index, 0)
    return Media(latents, index, first=first)
