"""Streaming image-text samples from webdataset shards.

The pipeline, stage by stage::

    shard list ─► this rank's and this worker's shards (shuffled per epoch, or resampled)
               ─► opened (local paths, http(s)://, pipe: URLs; failures counted by shard)
               ─► tar members grouped into samples
               ─► shuffle buffer ─► robust decode (bad samples skipped and counted)

In the default (non-resampled) mode every sample is read exactly once per epoch across all
ranks and DataLoader workers: shards are dealt out, rank first, then worker.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from vlm.data import remote
from vlm.data.decode import IMAGE_EXTENSIONS, MAX_PIXELS, BadSample, DecodeStats, decode_image
from vlm.data.remote import ShardError, opened
from vlm.data.samples import check_messages, placed_images

log = logging.getLogger(__name__)

#: Samples read before the share of bad ones can stop a pass (it is also judged at the end of
#: every pass): one bad shard at the start of a large dataset must not stop a run.
BAD_DATA_WINDOW = 1000
#: A frozen-feature cache sample's file of its images' sizes, when its features are tiles'.
SIZES = "sizes.json"


class BadDataError(RuntimeError):
    """Too much of the data is bad to train on; the message names the worst shards."""

    def __str__(self) -> str:
        text = super().__str__()
        # Re-raised from a DataLoader worker, the message carries the worker's traceback first.
        return text.rsplit("BadDataError: ", 1)[-1].strip() if "Original Traceback" in text else text


def expand_shards(specs: str | Sequence[str]) -> list[str]:
    """Shard URLs from brace patterns (``shard-{000000..000009}.tar``), directories (every
    ``*.tar`` inside), local globs, and remote or ``pipe:`` URLs (kept as they are). A local
    name that finds no shard (a missing file, a directory without ``*.tar``, a glob that matches
    nothing) is a ``FileNotFoundError`` naming it: a typo in one of several is not ignored."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    urls: list[str] = []
    for spec in specs:
        for url in wds.shardlists.expand_urls(spec):
            path = Path(url)
            if "://" in url or url.startswith("pipe:"):
                urls.append(url)
            elif path.is_dir():
                found = sorted(str(p) for p in path.glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"no shard (*.tar) in the directory {url!r}")
                urls += found
            elif any(c in url for c in "*?["):
                found = sorted(glob.glob(url))
                if not found:
                    raise FileNotFoundError(f"no shard file matches the glob {url!r}")
                urls += found
            elif path.is_file():
                urls.append(url)
            else:
                raise FileNotFoundError(f"no shard file or directory at {url!r}")
    return urls


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed, else from torchrun's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def split_shards(
    urls: Sequence[str], *, rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """This consumer's share: every ``world_size``-th shard for the rank, then every
    ``num_workers``-th of those for the worker. Each shard goes to exactly one consumer."""
    return list(urls[rank::world_size][worker::num_workers])


def decode_sample(
    raw: dict[str, Any], *, max_pixels: int = MAX_PIXELS, draft_size: int | None = None
) -> tuple[dict[str, Any], str | None]:
    """A tar sample to ``{"key", "url", "image" (PIL RGB), "text" (dict)}`` (plus ``"images"`` when
    it holds several; neither for a text-only conversation) and the mode it was converted from.

    A frozen-feature cache sample (``KEY.npy``: the encoder's features, ``(N_img, N, D)``, or
    its images' tiles' with ``KEY.sizes.json``, each image's ``(height, width)``) gives
    ``"features"`` (a tensor) and ``"image_sizes"`` instead of images.

    Raises ``BadSample`` (``missing_image``, ``missing_text``, ``bad_text``, ``bad_features``,
    ``image_count`` (a conversation or document with more or fewer ``<image>`` markers than
    images) or a decode reason).
    """
    exts = _image_keys(raw)
    if "json" in raw:
        try:
            text = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as err:
            raise BadSample("bad_text", str(err)) from err
        if not isinstance(text, dict) or not text:
            raise BadSample("bad_text", "json is not an object")
    elif raw.get("txt"):
        text = {"caption": raw["txt"].decode("utf-8", errors="replace").strip()}
    else:
        raise BadSample("missing_image" if not exts else "missing_text")
    if "messages" in text and (problem := check_messages(text["messages"])):
        raise BadSample("bad_text", problem)
    placed = placed_images(text)
    if placed is None and not exts and "npy" not in raw:
        raise BadSample("missing_image")
    if placed is not None and "npy" not in raw and placed != len(exts):
        raise BadSample("image_count", f"{placed} <image> marker(s) for {len(exts)} image(s)")
    if not exts and "npy" in raw:
        try:
            features = torch.from_numpy(np.load(io.BytesIO(raw["npy"]), allow_pickle=False))
        except Exception as err:  # noqa: BLE001 - a damaged array, whatever numpy raises
            raise BadSample("bad_features", f"{type(err).__name__}: {err}") from err
        sample = {"key": raw["__key__"], "url": raw.get("__url__", ""), "features": features, "text": text}
        if SIZES in raw:
            sample["image_sizes"] = [tuple(size) for size in json.loads(raw[SIZES])]
        return sample, None
    if not exts:  # a text-only conversation
        return {"key": raw["__key__"], "url": raw.get("__url__", ""), "text": text}, None
    decoded = [decode_image(raw[ext], max_pixels=max_pixels, draft_size=draft_size) for ext in exts]
    sample = {"key": raw["__key__"], "url": raw.get("__url__", ""), "image": decoded[0][0], "text": text}
    if len(exts) > 1:  # several images: KEY.0.jpg, KEY.1.jpg, ... in that order
        sample["images"] = [image for image, _ in decoded]
    converted = next((mode for _, mode in decoded if mode is not None), None)
    return sample, converted


def _image_keys(raw: dict[str, Any]) -> list[str]:
    """``jpg`` (one image) or ``0.jpg``, ``1.png``, ... (several, in numeric order)."""
    single = [e for e in (*IMAGE_EXTENSIONS, "img") if e in raw]
    if single:
        return single[:1]
    numbered = []
    for key in raw:
        index, _, ext = key.partition(".")
        if index.isdigit() and ext in (*IMAGE_EXTENSIONS, "img"):
            numbered.append((int(index), key))
    return [key for _, key in sorted(numbered)]


def _whole(raw_samples: Iterator[dict], failures: dict[str, str]) -> Iterator[dict]:
    """The samples, less the one a failed shard read cut short (the tar reader hands on the
    members it had; that sample comes right after the failure is recorded)."""
    failed = set(failures)
    for raw in raw_samples:
        new = set(failures) - failed
        failed |= new
        if raw.get("__url__") in new:
            continue
        yield raw


class ImageTextShards(IterableDataset):
    """Decoded image-text samples streamed from webdataset shards.

    Args:
        shards: shard URLs or patterns (see :func:`expand_shards`).
        shuffle_shards: shuffle the shard order every epoch (seeded by ``seed`` and the epoch).
        shuffle_buffer: samples held for shuffling; 0 or 1 keeps the stored order.
        resampled: draw shards at random with replacement, forever (for step-based training).
        seed: the seed of every random choice; the same seed gives the same order.
        rank, world_size: override the distributed position (default: torch.distributed / env).
        max_pixels: decompression-bomb limit.
        draft_size: decode large JPEGs at a reduced scale that still covers this many pixels
            on the short side (``decode_image``'s draft mode); ``None`` decodes in full.
        max_bad_fraction: raise :class:`BadDataError`, naming the worst shards, when more than
            this share of the samples read is bad (judged after :data:`BAD_DATA_WINDOW`
            samples and at the end of every pass), or more than this share of the consumer's
            shards failed (a 404, a connection cut more than ``shard_retries`` times, a stall,
            a failed ``pipe:`` command); ``None`` reads on whatever the share.
        shard_timeout_s: a shard whose server or command sends nothing for this long is given
            up (``stalled``); default ``data.remote.SHARD_TIMEOUT_S`` (60 s).
        shard_retries: times a cut connection to a remote shard is reopened where it stopped;
            default ``data.remote.SHARD_RETRIES`` (3).

    Samples are dicts ``{"key", "url", "image", "text"}``. Bad samples are skipped with a
    warning and counted; the counts of the last pass are in ``stats`` (in-process iteration) and
    logged at the end of every pass in each worker. Failed shards are skipped the same way:
    counted in ``stats`` as ``shard_<reason>`` and named in ``shard_failures`` (url -> reason).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        max_pixels: int = MAX_PIXELS,
        max_bad_fraction: float | None = None,
        draft_size: int | None = None,
        shard_timeout_s: float | None = None,
        shard_retries: int | None = None,
    ):
        super().__init__()
        self.urls = expand_shards(shards)
        if not self.urls:
            raise FileNotFoundError(f"no shards match {shards!r}")
        self.shuffle_shards, self.shuffle_buffer, self.resampled = shuffle_shards, shuffle_buffer, resampled
        self.seed, self.rank, self.world_size, self.max_pixels = seed, rank, world_size, max_pixels
        if max_bad_fraction is not None and not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be between 0 and 1, got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.draft_size = draft_size
        self.shard_timeout_s = remote.SHARD_TIMEOUT_S if shard_timeout_s is None else shard_timeout_s
        self.shard_retries = remote.SHARD_RETRIES if shard_retries is None else shard_retries
        self.epoch = 0
        self.stats = DecodeStats()
        self.shard_failures: dict[str, str] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _consumer(self) -> tuple[int, int, int, int]:
        rank, world = dist_info()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank, world, worker, workers

    def _shards(self, rng: random.Random, rank: int, world: int, worker: int, workers: int) -> Iterator[str]:
        if self.resampled:
            while True:
                yield rng.choice(self.urls)
        order = list(self.urls)
        if self.shuffle_shards:  # the same permutation on every rank and worker
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        yield from split_shards(order, rank=rank, world_size=world, worker=worker, num_workers=workers)

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, workers = self._consumer()
        rng = random.Random(f"{self.seed}:{self.epoch}:{rank}:{worker}")
        stats = self.stats = DecodeStats()
        by_shard: dict[str, Counter] = defaultdict(Counter)  # url -> {"ok": n, reason: n}
        failures = self.shard_failures = {}
        mine = None if self.resampled else len(list(self._shards(rng, rank, world, worker, workers)))
        current: dict[str, Any] = {"stream": None}  # the shard being read

        def on_failure(err: ShardError) -> None:  # once per shard and pass
            if err.url in failures:
                return
            failures[err.url] = err.reason
            stats.skipped[f"shard_{err.reason}"] += 1
            log.warning("skipping shard %s: %s (%s)", err.url, err.reason, err.detail)
            self._judge_shards(failures, mine, final=False)

        def on_error(err: Exception) -> bool:  # unreadable shard or tar member: count, go on
            failed = err if isinstance(err, ShardError) else getattr(current["stream"], "failed", None)
            if failed is not None:  # the tar reader stumbling over a failed read: said once
                on_failure(failed)
                return True
            stats.skipped["bad_shard"] += 1
            log.warning("skipping unreadable shard data: %s", err)
            return True

        urls = self._shards(rng, rank, world, worker, workers)
        options = dict(timeout_s=self.shard_timeout_s, retries=self.shard_retries)
        streams = opened(urls, on_failure, current, **options)
        members = wds.tariterators.tar_file_expander(streams, handler=on_error)
        raw_samples = wds.tariterators.group_by_keys(members, handler=on_error)
        for raw in self._shuffled(_whole(raw_samples, failures), rng):
            try:
                sample, converted = decode_sample(raw, max_pixels=self.max_pixels, draft_size=self.draft_size)
            except BadSample as bad:
                stats.skipped[bad.reason] += 1
                by_shard[raw.get("__url__", "")][bad.reason] += 1
                log.warning("skipping sample %s from %s: %s", raw.get("__key__"), raw.get("__url__"), bad)
                self._judge(stats, by_shard, final=False)
                continue
            if converted is not None:
                stats.converted[converted] += 1
            stats.ok += 1
            by_shard[sample["url"]]["ok"] += 1
            yield sample
        # Said at the end of every pass; loudly when something was skipped.
        level = logging.WARNING if stats.skipped else logging.INFO
        log.log(level, "end of pass (rank %d, worker %d): %s", rank, worker, stats.summary())
        self._judge_shards(failures, mine, final=True)
        self._judge(stats, by_shard, final=True)

    def _judge_shards(self, failures: dict[str, str], shards: int | None, *, final: bool) -> None:
        """Raises :class:`BadDataError` naming the failed shards when more than
        ``max_bad_fraction`` of this consumer's shards failed (at once when that is certain)."""
        if self.max_bad_fraction is None or not failures:
            return
        if shards is None:  # resampled: judged over the shards opened so far, after a few
            if len(failures) < 10:
                return
            shards = max(len(failures), 10)
        if len(failures) / shards <= self.max_bad_fraction:
            return
        named = "; ".join(f"{url} ({reason})" for url, reason in sorted(failures.items()))
        raise BadDataError(
            f"{len(failures)} of {shards} shards failed ({len(failures) / shards:.0%}, over "
            f"data.max_bad_fraction={self.max_bad_fraction}): {named}. Check that the shards are "
            "there and their server answers, or drop them, or raise data.max_bad_fraction."
        )

    def _judge(self, stats: DecodeStats, by_shard: dict[str, Counter], *, final: bool) -> None:
        """Raises :class:`BadDataError` when the share of bad samples is over the limit."""
        bad = sum(stats.skipped.values())
        seen = stats.ok + bad
        if self.max_bad_fraction is None or not seen or (seen < BAD_DATA_WINDOW and not final):
            return
        if bad / seen <= self.max_bad_fraction:
            return

        def bad_share(url: str) -> float:
            counts = by_shard[url]
            return 1 - counts["ok"] / max(1, counts.total())

        worst = sorted((u for u in by_shard if bad_share(u) > 0), key=bad_share, reverse=True)[:3]
        described = "; ".join(
            f"{url} ({by_shard[url].total() - by_shard[url]['ok']} of {by_shard[url].total()} bad: "
            + ", ".join(f"{r} {n}" for r, n in by_shard[url].most_common() if r != "ok")
            + ")"
            for url in worst
        )
        raise BadDataError(
            f"{bad} of the {seen} samples read are bad ({bad / seen:.0%}, over "
            f"data.max_bad_fraction={self.max_bad_fraction}); worst shards: {described}. "
            "See `vlm data check SHARDS`; fix or drop those shards, or raise data.max_bad_fraction."
        )
