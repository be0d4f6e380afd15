"""Training from remote shards that fail: a local HTTP server answers 404 for one shard, cuts the
connection halfway through another (once, or every time), and stalls on a third. The pipeline
counts each failure by shard with its reason, reopens a cut connection where it stopped a
bounded number of times, goes on with the other shards or stops under ``max_bad_fraction``
naming them, never hangs, and a resumed training run still repeats the uninterrupted one."""

import contextlib
import io
import shutil
import socket
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_data_pipeline import good_samples, write_tar
from test_train import losses, tiny_recipe

import vlm.train.checkpoint as checkpoint_module
from vlm.data.pipeline import BadDataError, ImageTextShards
from vlm.train.recipe import recipe_from_dict
from vlm.train.trainer import train

STALL_S = 1.0  # the shard timeout in these tests
RETRIES = 2


class Shards(BaseHTTPRequestHandler):
    """Serves ``server.root/NAME``; by the name's prefix: ``missing-`` 404, ``cut-once-`` cut
    halfway on its first request, ``cut-`` never past halfway (a request for the rest is cut
    before its first byte), ``stall-`` half then nothing. Ranges are honoured (206).
    ``server.hits`` counts requests by path."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 - http.server's name
        name = self.path.lstrip("/")
        self.server.hits[name] += 1
        path = self.server.root / name
        if name.startswith("missing-") or not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = path.read_bytes()
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if self.headers["Range"] else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        half = len(data) // 2
        cut = name.startswith("cut-") and not (name.startswith("cut-once-") and self.server.hits[name] > 1)
        if cut:
            self.wfile.write(data[start:half])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-body
            self.close_connection = True
        elif name.startswith("stall-"):
            self.wfile.write(data[start:half])
            self.wfile.flush()
            self.server.released.wait(30)  # nothing more until the test ends
            self.close_connection = True
        else:
            self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(root):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Shards)
    server.daemon_threads = True
    server.root, server.hits, server.released = root, Counter(), threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.released.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def shard_dir(tmp_path):
    """Four shards of 8 samples each (keys 0-31), under the names the server reacts to."""
    names = ["good-0.tar", "cut-once-1.tar", "cut-2.tar", "stall-3.tar"]
    for i, name in enumerate(names):
        write_tar(tmp_path / name, good_samples(8, start=8 * i))
    return tmp_path


def keys_in_first_half(path):
    """The samples whose files all lie in the first half of a shard's bytes."""
    members, half = [], path.stat().st_size // 2
    with open(path, "rb") as f:
        data = f.read(half)
    with (
        contextlib.suppress(tarfile.ReadError, EOFError),
        tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar,
    ):
        for info in tar:
            if info.offset_data + info.size <= half:
                members.append(info.name)
    by_key = Counter(name.split(".", 1)[0] for name in members)
    return sorted(k for k, n in by_key.items() if n == 2)  # both files of the sample (png, json)


def assert_first_half(keys, *paths):
    """``keys`` are those of the first half of each shard in turn, less at most each last one."""
    for path in paths:
        half = keys_in_first_half(path)
        assert len(half) >= 3
        got = keys[: len(half)]
        if got != half:  # the last of the half was left out
            got = keys[: len(half) - 1]
            assert got == half[:-1], (keys, half)
        keys = keys[len(got) :]
    assert not keys


def read_all(urls, **options):
    dataset = ImageTextShards(
        urls,
        shuffle_shards=False,
        shuffle_buffer=0,
        shard_timeout_s=STALL_S,
        shard_retries=RETRIES,
        **options,
    )
    start = time.monotonic()
    keys = [s["key"] for s in dataset]
    return dataset, keys, time.monotonic() - start


def test_failures_are_counted_by_shard_and_the_others_are_read(shard_dir):
    with serving(shard_dir) as (server, base):
        urls = [
            f"{base}/{name}"
            for name in ["good-0.tar", "missing-9.tar", "cut-once-1.tar", "cut-2.tar", "stall-3.tar"]
        ]
        dataset, keys, took = read_all(urls)
        assert dataset.shard_failures == {urls[1]: "http_404", urls[3]: "cut", urls[4]: "stalled"}
        # Each once, though the tar reader stumbles over a shard cut short more than once.
        assert dataset.stats.skipped == Counter(shard_http_404=1, shard_cut=1, shard_stalled=1)
        # good-0 whole, cut-once-1 whole after a retry; of the others what came before the cut
        # (the sample in progress when it failed is left out, whole or not).
        assert keys[:16] == [f"{i:06d}" for i in range(16)]
        assert_first_half(keys[16:], shard_dir / "cut-2.tar", shard_dir / "stall-3.tar")
        assert dataset.stats.ok == len(keys)  # no partial sample counted as a bad one
        assert server.hits["cut-once-1.tar"] == 2  # cut, then reopened where it stopped
        assert server.hits["cut-2.tar"] == 1 + RETRIES  # a bounded number of tries
        assert server.hits["missing-9.tar"] == 1  # a 404 is not retried
        assert took < 30  # the stall was given up after STALL_S, not waited out


def test_too_many_failed_shards_stop_the_pass_naming_them(shard_dir):
    with serving(shard_dir) as (_, base):
        urls = [f"{base}/{name}" for name in ["missing-9.tar", "stall-3.tar", "good-0.tar"]]
        start = time.monotonic()
        with pytest.raises(BadDataError) as stopped:
            read_all(urls, max_bad_fraction=0.5)
        assert time.monotonic() - start < 30
        message = str(stopped.value)
        assert "2 of 3 shards failed" in message and "data.max_bad_fraction=0.5" in message
        assert f"{urls[0]} (http_404)" in message and f"{urls[1]} (stalled)" in message


def test_pipe_shards_that_fail_or_stall(shard_dir):
    good, tar = shard_dir / "good-0.tar", shard_dir / "cut-2.tar"
    urls = [f"pipe:cat {good}", "pipe:exit 3", f"pipe:head -c {tar.stat().st_size // 2} {tar}; sleep 30"]
    dataset, keys, took = read_all(urls)
    assert dataset.shard_failures == {urls[1]: "pipe_exit_3", urls[2]: "stalled"}
    assert keys[:8] == [f"{i:06d}" for i in range(8)]
    assert_first_half(keys[8:], tar)
    assert took < 30


def test_training_goes_on_and_resumes_exactly(shapes_dir, tmp_path, monkeypatch):
    """Six shards, three of them failing: the run trains on the rest (12 steps, more than an
    epoch of captions), and 6 steps, a crash and a resumed 6 give the losses of 12 straight."""
    root = tmp_path / "served"
    root.mkdir()
    real = sorted((shapes_dir / "train").glob("*.tar"))
    for i, path in enumerate(real):
        shutil.copy(path, root / f"good-{i}.tar")
    shutil.copy(real[0], root / "cut-once-x.tar")
    shutil.copy(real[1], root / "stall-x.tar")
    with serving(root) as (server, base):
        names = ["good-0.tar", "missing-x.tar", "cut-once-x.tar", "good-1.tar", "stall-x.tar", "good-2.tar"]
        urls = [f"{base}/{name}" for name in names]

        def recipe(out, **run):
            tree = tiny_recipe(shapes_dir, out, max_steps=12, save_every=3, **run)
            tree["data"].update(train=urls, tasks=["caption"], shard_timeout_s=STALL_S)
            return recipe_from_dict(tree)

        train(recipe(tmp_path / "straight"), progress=False)
        assert server.hits["cut-once-x.tar"] >= 2 and server.hits["missing-x.tar"] >= 1
        assert server.hits["stall-x.tar"] >= 1

        real_save = checkpoint_module.save_checkpoint

        def crash_after_step_6(run_dir, step, **kwargs):
            path = real_save(run_dir, step, **kwargs)
            if step == 6:
                raise KeyboardInterrupt("simulated kill")
            return path

        monkeypatch.setattr("vlm.train.trainer.save_checkpoint", crash_after_step_6)
        with pytest.raises(KeyboardInterrupt):
            train(recipe(tmp_path / "interrupted"), progress=False)
        monkeypatch.setattr("vlm.train.trainer.save_checkpoint", real_save)
        train(recipe(tmp_path / "interrupted"), resume=True, progress=False)
    expected, got = losses(tmp_path / "straight"), losses(tmp_path / "interrupted")
    assert len(expected) == len(got) == 12 and got == expected
