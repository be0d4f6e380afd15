"""``vlm serve`` through the official ``openai`` client and raw HTTP: replies equal Predictor's,
batching changes nothing, bad input gets a 4xx in OpenAI's shape, and the server goes on."""

import base64
import http.client
import io
import json
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from PIL import Image
from saved import save_tiny_model
from serving import MODEL, image_part, running_server

from vlm.eval.predict import Predictor

DEADLINE_S = 60  # far above what any of these takes: a guard against hanging, not a timing


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("serve-model"), bridge="perceiver")


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir, max_images=3) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def predictor(model_dir):
    return Predictor(model_dir, device="cpu")


def red():
    return Image.new("RGB", (40, 40), (220, 30, 30))


def blue():
    return Image.new("RGB", (40, 40), (30, 30, 220))


def ask(text, *images):
    return {"role": "user", "content": [*(image_part(i) for i in images), {"type": "text", "text": text}]}


def as_predictor_messages(messages, images):
    """The same conversation in Predictor's format (PIL images in place of data URIs)."""
    images = iter(images)
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(m)
            continue
        parts = [
            {"type": "image", "image": next(images)} if p["type"] == "image_url" else p for p in m["content"]
        ]
        out.append({"role": m["role"], "content": parts})
    return out


def post(base, body, *, raw=None, headers=None, path="/v1/chat/completions", method="POST"):
    """(status, parsed JSON body) of a raw request."""
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=DEADLINE_S)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload) if payload else None


def health(base):
    return post(base, None, raw=b"", path="/health", method="GET")[1]


def test_a_completion_with_an_image_equals_predictor_greedy(client, predictor):
    messages = [ask("what is on the left?", red())]
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32)
    expected = predictor.chat(as_predictor_messages(messages, [red()]))
    assert reply.choices[0].message.content == expected and expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    prompt = predictor.processor.messages_prompt_ids(
        [{"role": "user", "content": "<image>\nwhat is on the left?"}]
    )
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chunks_join_into_the_same_text(client, predictor):
    messages = [ask("what color is it?", blue())]
    plain = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == plain.choices[0].message.content
    assert "".join(pieces) == predictor.chat(as_predictor_messages(messages, [blue()]))
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_a_conversation_with_two_images_equals_predictor(client, predictor):
    messages = [
        {"role": "system", "content": "answer briefly"},
        ask("what is on the left?", red()),
        {"role": "assistant", "content": "a red square"},
        ask("and here?", blue()),
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32)
    assert reply.choices[0].message.content == predictor.chat(
        as_predictor_messages(messages, [red(), blue()])
    )


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, client, predictor):
    """Requests that arrive together generate in one batch; the answers are what each gets alone."""
    questions = [("what is on the left?", red()), ("what color is it?", blue()), ("describe it", red())] * 3
    seen_running = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen_running.append(server[1].scheduler.running)
            stop.wait(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(len(questions)) as pool:
        replies = list(
            pool.map(
                lambda q: client.chat.completions.create(
                    model=MODEL, messages=[ask(q[0], q[1])], temperature=0, max_tokens=32
                ),
                questions,
            )
        )
    stop.set()
    watcher.join()
    for (text, image), reply in zip(questions, replies):
        alone = predictor.chat(as_predictor_messages([ask(text, image)], [image]))
        assert reply.choices[0].message.content == alone
    assert max(seen_running) > 1  # they really shared the batch


def test_stop_strings_cut_the_reply_before_them(client):
    messages = [ask("what is on the left?", red())]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32)
    text = full.choices[0].message.content
    word = text.split()[2]
    cut = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=32, stop=[word]
    )
    assert cut.choices[0].message.content == text[: text.index(word)].strip()
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=32, stop=word, stream=True
    )
    pieces = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert pieces == cut.choices[0].message.content


def test_a_seed_makes_sampling_repeat(client):
    def sample(seed):
        reply = client.chat.completions.create(
            model=MODEL, messages=[ask("describe it", red())], temperature=1.0, max_tokens=16, seed=seed
        )
        return reply.choices[0].message.content

    assert sample(3) == sample(3)
    assert len({sample(s) for s in range(4)}) > 1


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    status = health(server[0])
    assert status["status"] == "ok" and status["model"] == MODEL and status["running"] == 0


def bomb_uri():
    """A 6000 x 6000 PNG (36 M pixels) in about 36 KB: over the server's 16.7 M-pixel limit."""
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def good(**extra):
    return {
        "model": MODEL,
        "messages": [ask("what is it?", red())],
        "max_tokens": 4,
        "temperature": 0,
        **extra,
    }


def text_only(content, **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def image_url(url):
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
    }


BAD_REQUESTS = {
    # name: (raw body bytes or a JSON body, expected status, a word the message holds)
    "malformed_json": (b'{"model": "tiny-vlm", "messages": [', 400, "JSON"),
    "not_an_object": (b"[1, 2]", 400, "object"),
    "no_messages": ({"model": MODEL, "messages": []}, 400, "messages"),
    "no_model": ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    "unknown_role": ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    "unknown_part": (text_only([{"type": "audio", "audio": "..."}]), 400, "audio"),
    "last_turn_not_user": (
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        },
        400,
        "user",
    ),
    "too_many_images": (
        {"model": MODEL, "messages": [ask("which?", red(), blue(), red(), blue())]},
        400,
        "at most 3",
    ),
    "undecodable_image": (
        image_url("data:image/png;base64," + base64.b64encode(b"not a png").decode()),
        400,
        "image",
    ),
    "bad_base64": (image_url("data:image/png;base64,@@@"), 400, "base64"),
    "decompression_bomb": (image_url(bomb_uri()), 400, "pixels"),
    "remote_url": (image_url("http://example.com/cat.png"), 400, "remote"),
    "local_path": (image_url("/etc/passwd"), 400, "local"),
    "prompt_too_long": (text_only("red " * 2000), 400, "context length"),
    "max_tokens_too_many": (text_only("hi", max_tokens=100_000), 400, "context length"),
    "wrong_model": (dict(text_only("hi"), model="gpt-4o"), 404, "does not exist"),
    "bad_temperature": (text_only("hi", temperature=7), 400, "temperature"),
    "n_above_one": (text_only("hi", n=2), 400, "n=1"),
    "tools": (text_only("hi", tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    "penalty": (text_only("hi", frequency_penalty=0.5), 400, "frequency_penalty"),
    "too_many_stops": (text_only("hi", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_input_gets_a_4xx_in_openais_error_shape(server, name):
    body, status, word = BAD_REQUESTS[name]
    raw = body if isinstance(body, bytes) else None
    got, payload = post(server[0], body, raw=raw)
    assert got == status, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and word.lower() in error["message"].lower()
    assert error["type"] == "invalid_request_error"
    assert post(server[0], good())[0] == 200  # and it goes on serving


def test_a_body_over_the_limit_is_refused_before_it_is_read(model_dir):
    with running_server(model_dir, max_body_bytes=10_000) as (base, _):
        big = json.dumps(good(padding="x" * 20_000)).encode()
        status, payload = post(base, None, raw=big)
        assert status == 413 and payload["error"]["code"] == "request_too_large"
        assert post(base, good())[0] == 200


def test_unknown_routes_and_methods_answer_in_the_error_shape(server):
    status, payload = post(server[0], None, raw=b"", path="/v1/completions")
    assert status == 404 and payload["error"]["message"]
    status, payload = post(server[0], None, raw=b"", path="/v1/chat/completions", method="GET")
    assert status == 405 and payload["error"]["message"]


def test_local_images_only_inside_the_allowed_folder(model_dir, tmp_path):
    red().save(tmp_path / "red.png")
    with running_server(model_dir, local_images=tmp_path) as (base, _):
        assert post(base, dict(image_url((tmp_path / "red.png").as_uri()), max_tokens=3))[0] == 200
        assert post(base, dict(image_url("red.png"), max_tokens=3))[0] == 200
        status, payload = post(base, image_url("../" + tmp_path.name + "/../etc/passwd"))
        assert status == 400 and "outside" in payload["error"]["message"]


def test_a_client_that_disconnects_frees_its_slot(server):
    base, service = server
    before = service.scheduler.counts["cancelled"]
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=DEADLINE_S)
    body = json.dumps(dict(text_only("describe everything"), max_tokens=100, stream=True))
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event: it is generating
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + DEADLINE_S
    while service.scheduler.counts["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.scheduler.counts["cancelled"] == before + 1
    assert health(base)["running"] == 0


def test_an_error_inside_generation_fails_that_request_only(model_dir, monkeypatch):
    """A request whose prompt breaks the forward pass (here: an image without its placeholder,
    which the request checks cannot produce) gets a 500; one generating with it succeeds."""
    with running_server(model_dir) as (base, service):
        prepare = service.prepare

        def broken(request):
            prompt, pixels, sizes, settings = prepare(request)
            if "break" in str(request.messages[-1].content):
                prompt = [t for t in prompt if t != service.predictor.model.image_token_id]
            return prompt, pixels, sizes, settings

        monkeypatch.setattr(service, "prepare", broken)
        with ThreadPoolExecutor(2) as pool:
            bad = pool.submit(post, base, good(messages=[ask("break", red())]))
            fine = pool.submit(post, base, good(max_tokens=8))
            (bad_status, bad_body), (fine_status, _) = bad.result(), fine.result()
        assert bad_status == 500 and bad_body["error"]["type"] == "server_error"
        assert fine_status == 200 and health(base)["status"] == "ok"


def test_load_with_bad_requests_mixed_in(server):
    """120 malformed requests among 40 good ones, 8 at a time: every bad one is answered 4xx,
    none 5xx, every good one succeeds, and the server is healthy after."""
    kinds = list(BAD_REQUESTS.values())
    work = [("bad", kinds[i % len(kinds)]) for i in range(120)]
    work += [("good", (good(max_tokens=6), 200, "")) for _ in range(40)]
    work.sort(key=lambda item: hash(json.dumps(str(item[1][0])[:50])) % 7)  # interleaved

    def send(item):
        kind, (body, status, _) = item
        got, payload = post(server[0], body, raw=body if isinstance(body, bytes) else None)
        return kind, status, got, payload

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, work))
    bad = [r for r in results if r[0] == "bad"]
    assert len(bad) >= 100 and all(got == status and 400 <= got < 500 for _, status, got, _ in bad)
    assert all(
        got == 200 and p["choices"][0]["message"]["content"] is not None
        for k, _, got, p in results
        if k == "good"
    )
    assert not [r for r in results if r[2] >= 500]
    assert health(server[0])["status"] == "ok"


def test_the_context_is_what_the_lm_takes(server, predictor):
    """The tiny Llama has 128 positions though the model's max_length is 512: 128 it is."""
    assert predictor.processor.max_length == 512
    assert server[1].limits.context_length == predictor.model.decoder.lm.config.max_position_embeddings == 128
