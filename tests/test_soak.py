"""A soak of about 60 s: ``vlm serve`` (its own process) under a mixed load of good requests
(streamed and not), malformed ones, clients that leave mid-stream at random moments, and bursts
above ``--max-waiting``. Every admitted good request is answered as ``Predictor.chat`` answers
it (greedy), every refused one gets 503 with ``Retry-After``, nothing else is a 5xx, the
server's resident memory after the load is within 10 % of what it was after a warm-up, and
``/health`` is ok with no rows running.

It takes a minute: deselect it with ``-k "not soak"`` where that minute is not there."""

import base64
import http.client
import io
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from saved import save_tiny_model

from vlm.eval.predict import Predictor
from vlm.generate import GenerationConfig

pytestmark = pytest.mark.soak

ROOT = Path(__file__).parent.parent
MODEL = "tiny-vlm"
WARM_UP_S, SOAK_S = 12.0, 48.0
CLIENTS, MAX_BATCH, MAX_WAITING, TOKENS = 6, 4, 4, 8
TEXTS = ["what is it?", "what color is it?", "describe the picture", "where is the shape?"]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 30, 220)}


def malformed(**fields):
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


BAD_IMAGE = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]
MALFORMED = [  # (body, the status it must get)
    (b'{"model": "tiny-vlm", "messages": [', 400),
    (malformed(messages=[]), 400),
    (malformed(model="other"), 404),
    (malformed(messages=[{"role": "wizard", "content": "hi"}]), 400),
    (malformed(n=2), 400),
    (malformed(max_tokens=10**6), 400),
    (malformed(messages=[{"role": "user", "content": BAD_IMAGE}]), 400),
    (malformed(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400),
]


def data_uri(color):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), COLORS[color]).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(text, color, stream=False):
    content = [{"type": "image_url", "image_url": {"url": data_uri(color)}}, {"type": "text", "text": text}]
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": stream,
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("soak-model"), bridge="perceiver")


@pytest.fixture(scope="module")
def expected(model_dir):
    """Predictor's greedy reply to every (text, color) the load asks."""
    predictor = Predictor(model_dir, device="cpu", generation=GenerationConfig(max_new_tokens=TOKENS))
    replies = {}
    for text in TEXTS:
        for color, rgb in COLORS.items():
            image = Image.new("RGB", (40, 40), rgb)
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": image}, {"type": "text", "text": text}],
                }
            ]
            replies[text, color] = predictor.chat(messages)
    return replies


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """``vlm serve`` in a process of its own: ``(port, process)``."""
    log = tmp_path_factory.mktemp("soak-log") / "serve.log"
    for _ in range(3):  # a port another process took in between: try another
        port = free_port()
        command = [sys.executable, "-c", "import sys; from vlm.cli import main; sys.exit(main())", "serve"]
        command += ["--model", str(model_dir), "--port", str(port), "--served-model-name", MODEL]
        command += ["--max-batch-size", str(MAX_BATCH), "--max-waiting", str(MAX_WAITING)]
        command += ["--request-timeout", "300", "--device", "cpu"]
        with open(log, "a") as out:
            process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if get(port, "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        if process.poll() is None:
            break
    else:
        pytest.fail(f"vlm serve did not start:\n{log.read_text()[-3000:]}")
    yield port, process
    process.terminate()
    process.wait(timeout=30)


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def rss_kb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Load:
    """Clients sending the mix until ``stop``; outcomes tallied, problems listed."""

    def __init__(self, port, expected, seed):
        self.port, self.expected, self.rng = port, expected, random.Random(seed)
        self.outcomes, self.problems, self.lock = Counter(), [], threading.Lock()

    def note(self, outcome, problem=None):
        with self.lock:
            self.outcomes[outcome] += 1
            if problem:
                self.problems.append(problem)

    def send(self, raw, stream=False):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        conn.request("POST", "/v1/chat/completions", raw, {"Content-Type": "application/json"})
        return conn, conn.getresponse()

    def refused(self, kind, response, payload):
        """A 503: it must say when to retry, in OpenAI's error shape."""
        error = json.loads(payload)["error"]
        retry = response.getheader("Retry-After")
        ok = retry and int(retry) >= 1 and error["type"] == "server_error" and error["code"]
        self.note(f"{kind}: 503 {error['code']}", None if ok else f"a 503 without Retry-After: {error}")
        if kind != "burst":  # a client that backs off a little (not all of Retry-After: keep the pressure)
            time.sleep(self.rng.uniform(0.0, 0.5))

    def good(self, kind="plain"):
        text, color = self.rng.choice(TEXTS), self.rng.choice(list(COLORS))
        conn, response = self.send(json.dumps(body(text, color)).encode())
        payload = response.read()
        conn.close()
        if response.status == 503:
            return self.refused(kind, response, payload)
        if response.status != 200:
            return self.note(f"{kind}: {response.status}", f"{kind} got {response.status}: {payload[:300]}")
        got = json.loads(payload)["choices"][0]["message"]["content"]
        want = self.expected[text, color]
        self.note(f"{kind}: answered", None if got == want else f"{text}/{color}: {got!r} != {want!r}")

    def streamed(self, leave_after=None):
        kind = "streamed" if leave_after is None else "left mid-stream"
        text, color = self.rng.choice(TEXTS), self.rng.choice(list(COLORS))
        conn, response = self.send(json.dumps(body(text, color, stream=True)).encode())
        if response.status == 503:
            self.refused(kind, response, response.read())
            return conn.close()
        if response.status != 200:
            conn.close()
            return self.note(f"{kind}: {response.status}", f"{kind} got {response.status}")
        pieces, events = [], 0
        for line in response:
            if not line.startswith(b"data: "):
                continue
            events += 1
            if leave_after is not None and events > leave_after:
                conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-reply
                conn.close()
                return self.note(kind)
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                conn.close()
                return self.note(f"{kind}: error event", f"an error event: {event}")
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                pieces.append(event["choices"][0]["delta"]["content"])
        conn.close()
        want = self.expected[text, color]
        got = "".join(pieces).strip()
        self.note(
            f"{kind}: answered", None if got == want else f"streamed {text}/{color}: {got!r} != {want!r}"
        )

    def malformed(self):
        raw, status = self.rng.choice(MALFORMED)
        conn, response = self.send(raw)
        payload = response.read()
        conn.close()
        if response.status == 503:  # refused at admission, before the body is read
            return self.refused("malformed", response, payload)
        ok = response.status == status
        self.note(
            f"malformed: {response.status}", None if ok else f"malformed got {response.status}, not {status}"
        )

    def client(self, stop, seed):
        rng = random.Random(seed)
        while not stop.is_set():
            roll = rng.random()
            try:
                if roll < 0.35:
                    self.good()
                elif roll < 0.6:
                    self.streamed()
                elif roll < 0.8:
                    self.malformed()
                else:
                    self.streamed(leave_after=rng.randint(0, TOKENS))
            except (OSError, http.client.HTTPException, ValueError) as err:
                self.note("client error", f"{type(err).__name__}: {err}")

    def burst(self, n):
        """``n`` good requests at once: more than the batch and the queue take."""
        start = threading.Barrier(n)

        def one():
            start.wait()
            self.good("burst")

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def run(self, seconds):
        stop = threading.Event()
        clients = [
            threading.Thread(target=self.client, args=(stop, self.rng.random())) for _ in range(CLIENTS)
        ]
        for c in clients:
            c.start()
        end = time.monotonic() + seconds
        for when in (1 / 3, 2 / 3):
            time.sleep(max(0.0, end - seconds * (1 - when) - time.monotonic()))
            self.burst(3 * (MAX_BATCH + MAX_WAITING))
        time.sleep(max(0.0, end - time.monotonic()))
        stop.set()
        for c in clients:
            c.join(timeout=300)
        assert not any(c.is_alive() for c in clients), "a client hangs"


def idle(port):
    """``/health`` once nothing runs or waits (cancelled rows leave before the next step)."""
    deadline = time.monotonic() + 60
    while True:
        status, health = get(port, "/health")
        if health["running"] == 0 and health["waiting"] == 0 or time.monotonic() > deadline:
            return status, health
        time.sleep(0.1)


def test_soak_mixed_load_overload_and_disconnects(server, expected):
    port, process = server
    warm = Load(port, expected, seed=1)
    warm.run(WARM_UP_S)
    assert not warm.problems, warm.problems[:5]
    idle(port)
    time.sleep(1)
    before = rss_kb(process.pid)

    load = Load(port, expected, seed=2)
    load.run(SOAK_S)
    status, health = idle(port)
    time.sleep(1)
    after = rss_kb(process.pid)

    outcomes = dict(sorted(load.outcomes.items()))
    print(f"\nwarm-up ({WARM_UP_S:g} s): {dict(sorted(warm.outcomes.items()))}")
    print(f"soak ({SOAK_S:g} s): {outcomes}")
    print(
        f"RSS before {before / 1024:.1f} MB, after {after / 1024:.1f} MB ({(after - before) / before:+.1%})"
    )
    print(f"/health: {health}")
    assert not load.problems, load.problems[:5]
    answered = sum(n for k, n in outcomes.items() if k.endswith("answered"))
    refused = sum(n for k, n in outcomes.items() if ": 503" in k)
    assert answered >= 10 and refused >= 1 and outcomes.get("left mid-stream", 0) >= 2
    assert not [
        k for k in outcomes if k.split(": ")[-1][:1] == "5" and not k.split(": ")[-1].startswith("503")
    ]
    assert abs(after - before) <= 0.10 * before, (before, after)
    assert status == 200 and health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0
    assert health["rejected"] == refused + sum(n for k, n in warm.outcomes.items() if ": 503" in k)
    assert health["timed_out"] == 0
    assert process.poll() is None
