"""The generation thread: requests from the event loop join one continuously batched generation.

The HTTP handlers run on asyncio's loop; the model runs on one thread of its own (torch
releases the GIL in its kernels, so the loop stays responsive). Between two generation steps
the thread admits whatever arrived, up to ``max_batch_size`` rows; a finished or cancelled row
leaves at once. With ``max_batch_size=1`` requests run one at a time: the unbatched baseline.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from torch import Tensor

from vlm.engine import BatchedGeneration, Request
from vlm.eval.predict import ReplyText

log = logging.getLogger(__name__)


@dataclass
class Settings:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Finished:
    """The end of a reply: ``reason`` is ``stop``, ``length``, ``cancelled`` or ``error``."""

    reason: str
    text: str
    completion_tokens: int
    error: BaseException | None = None


class Scheduler:
    """Runs requests on the model's thread, batched continuously.

    Args:
        model: the ``VisionLanguageModel``.
        tokenizer: decodes the replies.
        eos_token_id, pad_token_id: as for generation.
        max_batch_size: rows generating at once (1: one request at a time).
    """

    def __init__(self, model, tokenizer, *, eos_token_id, pad_token_id: int, max_batch_size: int = 16):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.tokenizer, self.max_batch_size = tokenizer, max_batch_size
        self.batch = BatchedGeneration(model, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        self.pending: queue.Queue[Request] = queue.Queue()
        self.counts: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlm-generation", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return len(self.batch)

    @property
    def waiting(self) -> int:
        return self.pending.qsize()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopping.is_set():
            new = []
            if not len(self.batch):  # idle: sleep until something comes
                try:
                    new.append(self.pending.get(timeout=0.1))
                except queue.Empty:
                    continue
            while len(self.batch) + len(new) < self.max_batch_size:
                try:
                    new.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            try:
                if new:
                    self.batch.admit(new)
                else:
                    self.batch.step()
            except Exception:  # a bug of ours: keep the thread serving the next requests
                log.exception("the generation loop failed")
                for request in [*new, *self.batch.rows]:
                    request.on_finish("error", RuntimeError("the generation loop failed"))
                self.batch = BatchedGeneration(
                    self.batch.model, eos_token_id=list(self.batch.eos), pad_token_id=self.batch.pad
                )

    async def generate(
        self, prompt_ids: list[int], pixel_values: Tensor | None, settings: Settings
    ) -> AsyncIterator[str | Finished]:
        """The reply's text pieces as they come, then a :class:`Finished`. Leaving the loop
        early (the client went away) cancels the row: it leaves the batch before the next step."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[str | Finished] = asyncio.Queue()
        reply = ReplyText(self.tokenizer, settings.stop)

        def on_token(token: int) -> bool:
            going = reply.add(token)
            piece = reply.delta()
            if piece:
                loop.call_soon_threadsafe(events.put_nowait, piece)
            return going

        def on_finish(reason: str, error: BaseException | None) -> None:
            self.counts[
                {"stop": "completed", "length": "completed", "error": "failed"}.get(reason, reason)
            ] += 1
            piece = reply.delta(final=True)
            if piece:
                loop.call_soon_threadsafe(events.put_nowait, piece)
            done = Finished(reason, reply.text.strip(), len(reply.ids), error)
            loop.call_soon_threadsafe(events.put_nowait, done)

        request = Request(
            prompt_ids,
            pixel_values,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed,
            on_token=on_token,
            on_finish=on_finish,
        )
        self.pending.put(request)
        finished = False
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, Finished):
                    finished = True
                    return
        finally:
            if not finished:
                request.cancelled = True
