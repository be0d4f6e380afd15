"""The page at ``/`` in headless Chromium (Debian's ``chromium``, driven by Playwright): pick an
image, ask, watch the answer stream in, ask a follow-up. A screenshot goes to
``runs/test-output/serve-page.png``."""

import shutil
from pathlib import Path

import pytest
from PIL import Image
from saved import save_tiny_model
from serving import MODEL, image_part, running_server

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[1] / "runs" / "test-output" / "serve-page.png"
# No network here: Chromium's background services would only time out (see .ci/run).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium package)"
)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


def test_the_page_uploads_an_image_asks_and_shows_the_streamed_answer(browser, tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", bridge="perceiver")
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (220, 30, 30)).save(image)
    with running_server(model_dir) as (base, service):
        page = browser.new_page()
        page.goto(base + "/")
        page.wait_for_selector("#model:has-text('tiny-vlm')")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#preview[src^='data:image/png']")
        page.fill("#question", "what is on the left?")
        sent = []
        page.on(
            "request",
            lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None,
        )
        page.click("#send")
        first = page.locator(".turn.assistant").nth(0)
        page.wait_for_selector(".turn.assistant:not(.streaming) >> nth=0", timeout=60_000)
        answer = first.inner_text()

        # The page's answer is the API's for the same request (greedy, the page's 64 tokens).
        messages = [
            {
                "role": "user",
                "content": [image_part(Image.open(image)), {"type": "text", "text": "what is on the left?"}],
            }
        ]
        expected = api_answer(base, messages)
        assert answer == expected and answer
        # It streamed: asked for server-sent events, and the answer was built from several pieces
        # (counted as the page reads them; how many a network read carries depends on timing).
        assert sent[0]["stream"] is True and sent[0]["messages"][0]["content"][0]["type"] == "image_url"
        assert int(first.locator("span").get_attribute("data-pieces")) > 1

        page.fill("#question", "what color is it?")
        page.click("#send")
        page.wait_for_selector(".turn.assistant:not(.streaming) >> nth=1", timeout=60_000)
        follow_up = page.locator(".turn.assistant").nth(1).inner_text()
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "what color is it?"},
        ]
        assert follow_up == api_answer(base, messages)  # the history (and its image) went along
        assert page.locator(".turn.error").count() == 0
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        page.close()
    assert SCREENSHOT.stat().st_size > 0


def test_the_page_shows_the_servers_error(browser, tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", bridge="mlp2x_gelu")
    with running_server(model_dir, context_length=8) as (base, _):
        page = browser.new_page()
        page.goto(base + "/")
        page.wait_for_selector("#model:has-text('tiny-vlm')")
        page.fill("#question", "red " * 20)
        page.click("#send")
        error = page.wait_for_selector(".turn.error", timeout=60_000)
        assert "context length" in error.inner_text()
        page.close()


def api_answer(base, messages):
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=64)
    return reply.choices[0].message.content
