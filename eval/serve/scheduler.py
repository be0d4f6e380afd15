"""The generation thread: requests from the event loop join one continuously batched generation.

The HTTP handlers run on asyncio's loop; the model runs on one thread of its own (torch
releases the GIL in its kernels, so the loop stays responsive). Between two generation steps
the thread admits whatever arrived, up to ``max_batch_size`` rows; a finished or cancelled row
leaves at once. With ``max_batch_size=1`` requests run one at a time: the unbatched baseline.

Admission is bounded: at most ``max_waiting`` requests wait beyond the running rows (one more
is :class:`Overloaded` at once), and a request not finished ``request_timeout_s`` after it
arrived leaves, whether it was waiting or generating. A request that leaves (finished,
cancelled or timed out) drops its images and its row.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

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
    """The end of a reply: ``reason`` is ``stop``, ``length``, ``cancelled``, ``timeout`` or
    ``error``."""

    reason: str
    text: str
    completion_tokens: int
    error: BaseException | None = None


class Overloaded(Exception):
    """The server cannot take the request now: ``retry_after_s`` says when to try again."""

    def __init__(self, message: str, *, retry_after_s: int, code: str):
        super().__init__(message)
        self.retry_after_s, self.code = retry_after_s, code


@dataclass
class Ticket(Request):
    """A request as the scheduler keeps it: with its deadline, and why it left."""

    deadline: float = math.inf  # time.monotonic() after which it leaves
    timed_out: bool = field(default=False, init=False)


class Scheduler:
    """Runs requests on the model's thread, batched continuously, with bounded admission.

    Args:
        model: the ``VisionLanguageModel``.
        tokenizer: decodes the replies.
        eos_token_id, pad_token_id: as for generation.
        max_batch_size: rows generating at once (1: one request at a time).
        max_waiting: requests waiting beyond the running rows; one more is refused at once
            (:class:`Overloaded`). ``None``: no bound.
        request_timeout_s: a request not finished this long after it arrived leaves (waiting or
            generating) with ``Finished("timeout")``. ``None``: no deadline.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        eos_token_id,
        pad_token_id: int,
        max_batch_size: int = 16,
        max_waiting: int | None = None,
        request_timeout_s: float | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        if request_timeout_s is not None and request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        self.tokenizer, self.max_batch_size = tokenizer, max_batch_size
        self.max_waiting, self.request_timeout_s = max_waiting, request_timeout_s
        self.batch = BatchedGeneration(model, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        self.pending: deque[Ticket] = deque()
        self._arrived = threading.Condition()  # guards pending; notified when a request comes
        # completed, failed, cancelled, timed_out (from on_finish) and rejected (at admission).
        self.counts: Counter[str] = Counter()
        self._counting = threading.Lock()  # counts change on the loop's thread and the model's
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlm-generation", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return len(self.batch)

    @property
    def waiting(self) -> int:
        return len(self.pending)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)

    def check_admission(self) -> None:
        """Raises :class:`Overloaded` when a request arriving now would be refused (called
        before a request's body is read and its images decoded, so a burst costs little)."""
        if self._full():
            raise self._refuse()

    def _count(self, outcome: str) -> None:
        with self._counting:
            self.counts[outcome] += 1

    def _full(self) -> bool:
        return self.max_waiting is not None and len(self.pending) >= self.max_waiting

    def _refuse(self) -> Overloaded:
        self._count("rejected")
        return Overloaded(
            f"the server is at capacity ({self.running} requests generating, {len(self.pending)} "
            f"waiting, at most {self.max_waiting}); retry after the time in Retry-After",
            retry_after_s=self.retry_after_s(),
            code="server_overloaded",
        )

    def retry_after_s(self) -> int:
        """A client's wait before it retries: about the time for the queue ahead to drain, at
        least 1 s (the rows generating now leave within their token budgets)."""
        batches_ahead = (len(self.pending) + self.running) / self.max_batch_size
        return max(1, math.ceil(batches_ahead))

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._expire()
            new = self._take(self.max_batch_size - len(self.batch), wait=not len(self.batch))
            try:
                if new:
                    self.batch.admit(new)
                elif len(self.batch):
                    self.batch.step()
            except Exception:  # a bug of ours: keep the thread serving the next requests
                log.exception("the generation loop failed")
                for request in [*new, *self.batch.rows]:
                    request.on_finish("error", RuntimeError("the generation loop failed"))
                self.batch = BatchedGeneration(
                    self.batch.model, eos_token_id=list(self.batch.eos), pad_token_id=self.batch.pad
                )
            finally:
                for request in new:  # encoded now (or gone): the row needs its pixels no more
                    request.pixel_values = None

    def _take(self, room: int, *, wait: bool) -> list[Ticket]:
        """Up to ``room`` waiting requests, oldest first; when ``wait``, sleeps a little for one."""
        with self._arrived:
            if wait and not self.pending:
                self._arrived.wait(timeout=0.1)
            return [self.pending.popleft() for _ in range(min(room, len(self.pending)))]

    def _expire(self) -> None:
        """Requests past their deadline leave: waiting ones now, generating ones before the
        next step (their rows are cancelled)."""
        now = time.monotonic()
        with self._arrived:
            late = [t for t in self.pending if t.deadline <= now]
            for ticket in late:
                self.pending.remove(ticket)
        for ticket in late:
            ticket.timed_out = True
            ticket.on_finish("cancelled", None)
        for row in self.batch.rows:
            if isinstance(row, Ticket) and row.deadline <= now and not row.cancelled:
                row.timed_out, row.cancelled = True, True

    def _cancel(self, ticket: Ticket) -> None:
        """The caller went away: a waiting request leaves the queue now (and drops its images),
        a generating one leaves the batch before the next step."""
        with self._arrived:
            try:
                self.pending.remove(ticket)
                queued = True
            except ValueError:
                queued = False
        ticket.cancelled = True
        if queued:
            ticket.on_finish("cancelled", None)

    def submit(
        self,
        prompt_ids: list[int],
        pixel_values: Tensor | None,
        settings: Settings,
        *,
        image_sizes: Tensor | None = None,
    ) -> AsyncIterator[str | Finished]:
        """Queues a request at once, or raises :class:`Overloaded`; returns the reply's text
        pieces as they come, then a :class:`Finished`. Leaving that loop early (the client went
        away) cancels the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[str | Finished] = asyncio.Queue()
        reply = ReplyText(self.tokenizer, settings.stop)
        ended = threading.Event()

        def on_token(token: int) -> bool:
            going = reply.add(token)
            piece = reply.delta()
            if piece:
                loop.call_soon_threadsafe(events.put_nowait, piece)
            return going

        def on_finish(reason: str, error: BaseException | None) -> None:
            if ended.is_set():
                return
            ended.set()
            if reason == "cancelled" and ticket.timed_out:
                reason = "timeout"
            names = {"stop": "completed", "length": "completed", "error": "failed", "timeout": "timed_out"}
            self._count(names.get(reason, reason))
            ticket.pixel_values = None
            piece = reply.delta(final=True)
            if piece:
                loop.call_soon_threadsafe(events.put_nowait, piece)
            done = Finished(reason, reply.text.strip(), len(reply.ids), error)
            loop.call_soon_threadsafe(events.put_nowait, done)

        timeout = self.request_timeout_s
        ticket = Ticket(
            prompt_ids,
            pixel_values,
            image_sizes,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed,
            on_token=on_token,
            on_finish=on_finish,
            deadline=math.inf if timeout is None else time.monotonic() + timeout,
        )
        with self._arrived:
            if self._full():
                raise self._refuse()
            self.pending.append(ticket)
            self._arrived.notify()
        return self._events(ticket, events)

    async def _events(self, ticket: Ticket, events: asyncio.Queue) -> AsyncIterator[str | Finished]:
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
                self._cancel(ticket)
