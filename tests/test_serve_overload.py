"""``vlm serve`` under overload: past ``max_waiting`` a request gets 503 with ``Retry-After`` at
once, past its deadline too; ``/health`` counts them; a request that leaves (timed out or its
client gone) frees its row and its images, and the admitted requests are answered as before.

The generation thread is held at a gate (its ``admit``) so that the queue's state is exact,
not a matter of timing."""

import contextlib
import gc
import http.client
import json
import threading
import time
import urllib.parse
import weakref
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from saved import save_tiny_model
from serving import MODEL, running_server
from test_serve import as_predictor_messages, ask, red

from vlm.eval.predict import Predictor
from vlm.generate import GenerationConfig

DEADLINE_S = 60  # a guard against hanging, not a timing


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("overload-model"), bridge="perceiver")


@pytest.fixture(scope="module")
def predictor(model_dir):
    return Predictor(model_dir, device="cpu", generation=GenerationConfig(max_new_tokens=6))


def request(base, body, *, timeout=DEADLINE_S):
    """(status, headers, parsed body) of a POST to the chat-completions route."""
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), json.loads(payload)


def health(base):
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=DEADLINE_S)
    conn.request("GET", "/health")
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def chat(text, **extra):
    return {"model": MODEL, "messages": [ask(text, red())], "max_tokens": 6, "temperature": 0, **extra}


@contextlib.contextmanager
def gate(scheduler):
    """Holds the generation thread inside ``admit`` until the test opens the gate; yields
    ``(entered, open)`` events."""
    entered, opened = threading.Event(), threading.Event()
    real = scheduler.batch.admit

    def admit(requests):
        entered.set()
        opened.wait(DEADLINE_S)
        real(requests)

    scheduler.batch.admit = admit
    try:
        yield entered, opened
    finally:
        opened.set()
        scheduler.batch.admit = real


def until(condition, what):
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def watch_pixels(service):
    """Wraps ``service.prepare`` so every request's pixel tensor is watched by a weak reference."""
    refs, prepare = [], service.prepare

    def watched(request):
        prepared = prepare(request)  # (prompt, pixels, image sizes, settings)
        if prepared[1] is not None:
            refs.append(weakref.ref(prepared[1]))
        return prepared

    service.prepare = watched
    return refs


def test_past_max_waiting_a_request_gets_503_with_retry_after_at_once(model_dir, predictor):
    with running_server(model_dir, max_batch_size=1, max_waiting=2) as (base, service):
        scheduler = service.scheduler
        texts = ["what is it?", "and the color?", "where is it?"]
        with gate(scheduler) as (entered, opened), ThreadPoolExecutor(3) as pool:
            first = pool.submit(request, base, chat(texts[0]))
            assert entered.wait(DEADLINE_S)  # held in admission: it waits no more
            queued = [pool.submit(request, base, chat(t)) for t in texts[1:]]
            until(lambda: scheduler.waiting == 2, "two requests waiting")

            start = time.monotonic()
            status, headers, body = request(base, chat("one too many"))
            assert time.monotonic() - start < 5  # answered at once, not after the queue
            assert status == 503 and int(headers["retry-after"]) >= 1
            assert body["error"]["type"] == "server_error" and body["error"]["code"] == "server_overloaded"
            assert "Retry-After" in body["error"]["message"]
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.APIStatusError) as refused:
                client.chat.completions.create(model=MODEL, messages=[ask("again", red())], max_tokens=3)
            assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"]

            status = health(base)
            assert status["waiting"] == 2 and status["rejected"] == 2 and status["max_waiting"] == 2
            opened.set()
            answers = [f.result() for f in [first, *queued]]
        for text, (code, _, reply) in zip(texts, answers):
            expected = predictor.chat(as_predictor_messages([ask(text, red())], [red()]))
            assert code == 200 and reply["choices"][0]["message"]["content"] == expected
        until(lambda: health(base)["running"] == 0, "the rows left")
        status = health(base)
        assert status["status"] == "ok" and status["waiting"] == 0 and status["rejected"] == 2
        assert status["requests"]["completed"] == 3
        # With room again, the next request is served.
        assert request(base, chat("now?"))[0] == 200


def test_a_request_past_its_deadline_gets_503_and_frees_its_row_and_images(model_dir):
    with running_server(model_dir, max_batch_size=1, request_timeout_s=1.0) as (base, service):
        scheduler, refs = service.scheduler, watch_pixels(service)
        with gate(scheduler) as (entered, opened), ThreadPoolExecutor(3) as pool:
            generating = pool.submit(request, base, chat("held", max_tokens=100))
            assert entered.wait(DEADLINE_S)
            waiting = pool.submit(request, base, chat("queued"))
            streamed = pool.submit(stream_events, base, chat("queued and streamed", stream=True))
            until(lambda: scheduler.waiting == 2, "two requests waiting")
            time.sleep(1.2)  # every deadline has passed
            opened.set()
            results = [generating.result(), waiting.result()]
            events = streamed.result()
        for status, headers, body in results:  # the one admitted at the gate and the one waiting
            assert status == 503 and int(headers["retry-after"]) >= 1
            assert body["error"]["code"] == "request_timeout" and "1 s" in body["error"]["message"]
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout"
        until(lambda: health(base)["running"] == 0, "the rows left")
        status = health(base)
        assert status["timed_out"] == 3 and status["waiting"] == 0 and status["status"] == "ok"
        gc.collect()
        assert len(refs) == 3 and all(ref() is None for ref in refs)  # the images are gone
        assert request(base, chat("in time"))[0] == 200


def stream_events(base, body):
    """The server-sent events of a streamed request, parsed (``[DONE]`` as is)."""
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=DEADLINE_S)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    events = []
    for line in response.read().decode().splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    conn.close()
    return events


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_while_waiting_frees_its_place_and_images(model_dir, stream):
    with running_server(model_dir, max_batch_size=1, max_waiting=1) as (base, service):
        scheduler, refs = service.scheduler, watch_pixels(service)
        with gate(scheduler) as (entered, opened), ThreadPoolExecutor(2) as pool:
            first = pool.submit(request, base, chat("held"))
            assert entered.wait(DEADLINE_S)
            url = urllib.parse.urlparse(base)
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=DEADLINE_S)
            body = json.dumps(chat("leaving", stream=stream))
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            until(lambda: scheduler.waiting == 1, "the request waiting")
            if stream:
                response = conn.getresponse()
                assert response.status == 200 and response.readline().startswith(b"data: ")
            conn.sock.shutdown(2)
            conn.close()
            until(lambda: scheduler.waiting == 0, "the request left the queue")
            assert scheduler.counts["cancelled"] == 1
            gc.collect()
            assert refs[1]() is None  # its images went with it, while the first still waits
            after = pool.submit(request, base, chat("in its place"))
            until(lambda: scheduler.waiting == 1, "the next request waiting in its place")
            opened.set()
            assert first.result()[0] == 200 and after.result()[0] == 200
        until(lambda: health(base)["running"] == 0, "the rows left")
        assert health(base)["status"] == "ok"
