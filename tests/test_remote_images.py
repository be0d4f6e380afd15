"""``vlm serve --allow-remote-images`` cannot be turned inward: a URL to the server's own network
(directly or by a redirect) is refused, a slow drip is cut at the fetch's deadline, an oversized
body at the size cap, each with a 4xx, and the server stays healthy. With
``--allow-private-image-hosts`` a loopback server's image is fetched and answered as Predictor
answers it.

Image servers run on 127.0.0.1 in this process. Where a test needs a host the server may reach
without the private-hosts flag, it lets 127.0.0.1 stand in for a public address (the address
check is patched for that one address only); every other address is checked as it is."""

import contextlib
import http.client
import io
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from saved import save_tiny_model
from serving import MODEL, image_part, running_server

import vlm.eval.serve.fetch as fetch_module
from vlm.eval.predict import Predictor
from vlm.eval.serve.fetch import refusal

DEADLINE_S = 60  # a guard against hanging, not a timing
FETCH_TIMEOUT_S = 1.0
MAX_BYTES = 64 * 2**10


def png(color=(220, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buffer, format="PNG")
    return buffer.getvalue()


class Images(BaseHTTPRequestHandler):
    """/red.png, redirects (/to?url=...), a drip of the body or of the headers, oversized
    bodies with and without a Content-Length."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 - http.server's name
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/red.png":
            self._send(200, png())
        elif url.path == "/to":
            self.send_response(302)
            self.send_header("Location", query["url"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif url.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif url.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self._drip(b"x" * 1000)
        elif url.path == "/drip-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._drip(b"X-Slow: " + b"y" * 1000 + b"\r\n\r\n")
        elif url.path == "/big":
            self._send(200, b"z" * (MAX_BYTES + 1))
        elif url.path == "/big-undeclared":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(b"z" * (4 * MAX_BYTES))
            self.close_connection = True
        else:
            self._send(404, b"no such image")

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drip(self, data):
        """A byte every 50 ms (each read is quick, the whole is not), for at most 10 s."""
        stop = time.monotonic() + 10
        with contextlib.suppress(OSError):
            for byte in data:
                if time.monotonic() > stop:
                    break
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def images():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("remote-model"), bridge="perceiver")


@pytest.fixture(scope="module")
def server(model_dir):
    limits = dict(remote_images=True, remote_timeout_s=FETCH_TIMEOUT_S, max_body_bytes=MAX_BYTES)
    with running_server(model_dir, **limits) as running:
        yield running


@pytest.fixture
def loopback_is_public(monkeypatch):
    """127.0.0.1 stands in for a public host; other addresses are checked as they are."""
    monkeypatch.setattr(fetch_module, "refusal", lambda a: None if a == "127.0.0.1" else refusal(a))


def ask_about(url, max_tokens=4):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def call(base, method, path, body=None):
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=DEADLINE_S)
    conn.request(
        method, path, None if body is None else json.dumps(body), {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload


def post(base, body):
    return call(base, "POST", "/v1/chat/completions", body)


def assert_healthy(base):
    status, body = call(base, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["running"] == 0
    good = {"model": MODEL, "messages": [{"role": "user", "content": [image_part(Image.new("RGB", (8, 8)))]}]}
    assert post(base, {**good, "max_tokens": 2})[0] == 200


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "224.0.0.1",
     "240.0.0.1", "0.0.0.0", "100.64.0.1", "::1", "fe80::1", "fc00::1", "ff02::1",
     "::ffff:127.0.0.1", "::ffff:169.254.169.254"],
)  # fmt: skip
def test_inward_addresses_are_refused(address):
    assert refusal(address) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address):
    assert refusal(address) is None


def test_a_loopback_url_is_refused(server, images):
    start = time.monotonic()
    for url in (images + "/red.png", images.replace("127.0.0.1", "localhost") + "/red.png"):
        status, body = post(server[0], ask_about(url))
        assert status == 400 and body["error"]["code"] == "image_host_refused", body
        assert (
            "loopback" in body["error"]["message"]
            and "--allow-private-image-hosts" in body["error"]["message"]
        )
        assert body["error"]["param"] == "messages.0.content.0.image_url"
    assert time.monotonic() - start < 10
    assert_healthy(server[0])


@pytest.mark.usefixtures("loopback_is_public")
@pytest.mark.parametrize(
    ("target", "kind"),
    [("http://127.0.0.2:1/x.png", "loopback"), ("http://169.254.169.254/latest/meta-data/", "link-local"),
     ("http://10.0.0.1/x.png", "private"), ("http://[::1]:1/x.png", "loopback")],
)  # fmt: skip
def test_a_redirect_inward_is_refused(server, images, target, kind):
    url = images + "/to?" + urllib.parse.urlencode({"url": target})
    status, body = post(server[0], ask_about(url))
    assert status == 400 and body["error"]["code"] == "image_host_refused", body
    assert kind in body["error"]["message"]
    assert_healthy(server[0])


@pytest.mark.usefixtures("loopback_is_public")
def test_redirects_are_followed_three_times_at_most(server, images):
    def hops(n):  # a chain of n redirects ending at the image
        url = images + "/red.png"
        for _ in range(n):
            url = images + "/to?" + urllib.parse.urlencode({"url": url})
        return url

    assert post(server[0], ask_about(hops(3)))[0] == 200
    for url in (hops(4), images + "/loop"):
        status, body = post(server[0], ask_about(url))
        assert status == 400 and body["error"]["code"] == "image_too_many_redirects", body
    assert_healthy(server[0])


@pytest.mark.usefixtures("loopback_is_public")
@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_a_slow_drip_is_cut_at_the_deadline(server, images, path):
    start = time.monotonic()
    status, body = post(server[0], ask_about(images + path))
    took = time.monotonic() - start
    assert status == 400 and body["error"]["code"] == "image_fetch_timeout", body
    assert FETCH_TIMEOUT_S <= took < FETCH_TIMEOUT_S + 6  # the drip would last 10 s
    assert_healthy(server[0])


@pytest.mark.usefixtures("loopback_is_public")
@pytest.mark.parametrize("path", ["/big", "/big-undeclared"])
def test_an_oversized_body_is_refused(server, images, path):
    status, body = post(server[0], ask_about(images + path))
    assert status == 413 and body["error"]["code"] == "image_too_large", body
    assert_healthy(server[0])


@pytest.mark.usefixtures("loopback_is_public")
def test_a_missing_image_is_a_4xx(server, images):
    status, body = post(server[0], ask_about(images + "/nothing.png"))
    assert status == 400 and "404" in body["error"]["message"]


def test_with_private_hosts_allowed_a_loopback_image_is_answered(model_dir, images):
    predictor = Predictor(model_dir, device="cpu")
    limits = dict(remote_images=True, private_image_hosts=True, remote_timeout_s=FETCH_TIMEOUT_S)
    with running_server(model_dir, **limits) as (base, _):
        status, body = post(base, ask_about(images + "/red.png", max_tokens=32))
        assert status == 200
        red = Image.open(io.BytesIO(png())).convert("RGB")
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": red}, {"type": "text", "text": "what is it?"}],
            }
        ]
        assert body["choices"][0]["message"]["content"] == predictor.chat(messages)
        status, body = post(base, ask_about(images + "/drip"))  # the deadline holds here too
        assert status == 400 and body["error"]["code"] == "image_fetch_timeout"
        assert_healthy(base)
