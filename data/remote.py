"""Opening shards that can fail: ``http(s)://`` URLs, ``pipe:`` commands and local files.

A remote shard fails in ways a local one does not: the server answers 404, the connection is
cut halfway, or the server (or the command) stalls. Each of these ends as a
:class:`ShardError` with a short ``reason`` (``http_404``, ``cut``, ``stalled``, ``pipe_exit_1``,
``unreadable``...), which the pipeline counts by shard and goes on. A cut connection is
reopened where it stopped (an HTTP ``Range`` request; from the start, skipping what was read,
where the server ignores ranges) up to ``retries`` times; a read that waits more than
``timeout_s`` gives the shard up, so a stalled server or command never hangs a run.
"""

from __future__ import annotations

import http.client
import os
import select
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

from webdataset import gopen

#: A read that waits longer than this gives the shard up (``stalled``).
SHARD_TIMEOUT_S = 60.0
#: Times a cut connection (or a 5xx, or a refused connection) is retried before the shard fails.
SHARD_RETRIES = 3


class ShardError(OSError):
    """A shard that could not be read to its end: ``reason`` names why, ``url`` which."""

    def __init__(self, url: str, reason: str, detail: str):
        super().__init__(f"{url}: {reason} ({detail})")
        self.url, self.reason, self.detail = url, reason, detail


def open_shard(url: str, *, timeout_s: float = SHARD_TIMEOUT_S, retries: int = SHARD_RETRIES):
    """A readable binary stream of the shard at ``url`` (raises :class:`ShardError`, also later
    from ``read``)."""
    if url.startswith(("http://", "https://")):
        return HTTPShard(url, timeout_s=timeout_s, retries=retries)
    if url.startswith("pipe:"):
        return PipeShard(url, timeout_s=timeout_s)
    if "://" in url and not url.startswith("file://"):
        return gopen.gopen(url)  # other schemes (s3://, gs://...): webdataset's openers
    path = url.removeprefix("file://")
    try:
        return open(path, "rb")  # noqa: SIM115 - the pipeline closes it after the shard
    except OSError as err:
        raise ShardError(url, "unreadable", f"{type(err).__name__}: {err}") from None


def opened(urls: Iterable[str], on_failure, current: dict, **options: Any) -> Iterator[dict[str, Any]]:
    """``{"url", "stream"}`` for each shard (webdataset's tar expander reads them); a shard that
    cannot be opened goes to ``on_failure`` (a :class:`ShardError`) and is passed over.
    ``current["stream"]`` is the shard being read (its ``failed`` says whether a read failed).
    Each stream is closed once the next shard is asked for."""
    stream = None
    try:
        for url in urls:
            try:
                stream = open_shard(url, **options)
            except ShardError as err:
                on_failure(err)
                continue
            current["stream"] = stream
            yield {"url": url, "stream": stream}
            stream.close()
            stream = current["stream"] = None
    finally:
        if stream is not None:
            stream.close()


class _Failing:
    """A stream that, once a read failed, keeps its error in ``failed`` and reads as empty."""

    failed: ShardError | None = None

    def read(self, n: int = -1) -> bytes:
        if self.failed is not None:
            return b""
        try:
            return self._read(n)
        except ShardError as err:
            self.failed = err
            raise


class HTTPShard(_Failing):
    """An HTTP(S) body read with a per-read timeout, reopened where it stopped when cut."""

    def __init__(self, url: str, *, timeout_s: float, retries: int):
        self.url, self.timeout_s, self.retries = url, timeout_s, retries
        self.position, self.length, self.tries = 0, None, 0
        self.response = None
        self._open()

    def _open(self) -> None:
        while True:
            request = urllib.request.Request(self.url, headers={"User-Agent": "vlm-data"})
            if self.position:
                request.add_header("Range", f"bytes={self.position}-")
            try:
                response = urllib.request.urlopen(request, timeout=self.timeout_s)  # noqa: S310
            except urllib.error.HTTPError as err:
                err.close()
                if err.code < 500:  # the server says no: asking again changes nothing
                    raise ShardError(self.url, f"http_{err.code}", err.reason or "") from None
                self._retry(f"http_{err.code}", str(err.reason))
                continue
            except TimeoutError:
                raise ShardError(self.url, "stalled", f"no answer in {self.timeout_s:g} s") from None
            except (OSError, http.client.HTTPException) as err:
                self._retry("unreachable", f"{type(err).__name__}: {err}")
                continue
            if self.position and response.status == 200:  # ranges ignored: skip what was read
                self._skip(response, self.position)
            elif self.length is None:
                declared = response.headers.get("Content-Length")
                self.length = int(declared) if declared and declared.isdigit() else None
            self.response = response
            return

    def _skip(self, response, n: int) -> None:
        while n:
            piece = response.read(min(n, 2**16))
            if not piece:
                raise ShardError(self.url, "cut", "the shard is shorter on a second reading")
            n -= len(piece)

    def _retry(self, reason: str, detail: str) -> None:
        """Waits before another try, or gives the shard up when its tries are spent."""
        if self.tries >= self.retries:
            tries = f"after {self.tries} retries" if self.tries else "not retried"
            raise ShardError(self.url, reason, f"{detail}; {tries}")
        time.sleep(min(0.1 * 2**self.tries, 2.0))
        self.tries += 1

    def _read(self, n: int) -> bytes:
        while True:
            try:
                # read1: what has come, at most n (read(n) would wait for all n, and a stall
                # would then lose what came before it).
                data = self.response.read1(n) if n is not None and n >= 0 else self.response.read()
            except TimeoutError:
                raise ShardError(
                    self.url, "stalled", f"no data for {self.timeout_s:g} s at byte {self.position}"
                ) from None
            except (OSError, http.client.HTTPException) as err:  # IncompleteRead, reset...
                data, detail = getattr(err, "partial", b""), f"{type(err).__name__} at byte {self.position}"
            else:
                short = not data and n != 0 and self.length is not None and self.position < self.length
                if not short:
                    self.position += len(data)
                    return data
                detail = f"the connection closed at byte {self.position} of {self.length}"
            if data:  # what arrived before the cut is good: keep it, reopen after it
                self.position += len(data)
                self._reopen("cut", detail)
                return data
            self._reopen("cut", detail)

    def _reopen(self, reason: str, detail: str) -> None:
        self.response.close()
        self._retry(reason, detail)
        self._open()

    def close(self) -> None:
        if self.response is not None:
            self.response.close()


class PipeShard(_Failing):
    """A ``pipe:COMMAND``'s output, read with a per-read timeout; a command that exits with a
    failure fails the shard."""

    def __init__(self, url: str, *, timeout_s: float):
        self.url, self.timeout_s = url, timeout_s
        self.process = subprocess.Popen(url.removeprefix("pipe:"), shell=True, stdout=subprocess.PIPE)  # noqa: S602
        self.fd = self.process.stdout.fileno()

    def _read(self, n: int) -> bytes:
        chunks, wanted = [], n if n is not None and n >= 0 else None
        while wanted is None or wanted > 0:
            ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
            if not ready:
                self.close()
                raise ShardError(self.url, "stalled", f"the command wrote nothing for {self.timeout_s:g} s")
            piece = os.read(self.fd, 2**16 if wanted is None else min(wanted, 2**16))
            if not piece:
                code = self.process.wait()
                if code:
                    raise ShardError(self.url, f"pipe_exit_{code}", "the command failed")
                break
            chunks.append(piece)
            if wanted is not None:
                wanted -= len(piece)
                break  # a short read is fine: the tar reader asks again
        return b"".join(chunks)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()
