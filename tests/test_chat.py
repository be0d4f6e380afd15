"""Chat: Predictor.chat over transformers-style messages, streamed; ``vlm chat`` in a terminal."""

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from saved import save_tiny_model

from vlm.eval import predict
from vlm.eval.predict import InputError, Predictor, load_image
from vlm.generate import generate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("chat-model"), bridge="perceiver")


@pytest.fixture(scope="module")
def predictor(model_dir):
    return Predictor(model_dir, device="cpu")


def red(size=40):
    return Image.new("RGB", (size, size), (220, 30, 30))


def ask(text, image=None):
    parts = [{"type": "image", "image": image}] if image is not None else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_a_reply_streams_in_pieces_that_join_into_it(predictor):
    pieces = []
    reply = predictor.chat([ask("what is on the left?", red())], on_text=pieces.append)
    assert reply and len(pieces) > 1 and "".join(pieces).strip() == reply


def test_chat_prompts_the_history_with_its_images_in_place(predictor):
    history = [ask("what is on the left?", red()), {"role": "assistant", "content": "a red circle"}]
    history.append(ask("what color is it?"))
    reply = predictor.chat(history)
    text = [
        {"role": "user", "content": "<image>\nwhat is on the left?"},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "what color is it?"},
    ]
    ids = predictor.processor.messages_prompt_ids(text)
    new = generate(
        predictor.model, torch.tensor([ids]), None, predictor.transform(red())[None], predictor.generation
    )
    assert reply == predictor.tokenizer.decode(new[0], skip_special_tokens=True).strip()
    assert reply != predictor.chat([ask("what color is it?", red())])  # the history matters


GREEN, SQUARE = (20, 180, 40), (8, 8, 32, 32)


def green_square(mode: str) -> Image.Image:
    """A green square on white, as RGB, as RGBA (the white is transparent black) or as a palette
    image (index 0 white, 1 green: read as raw indices, it is a black image)."""
    if mode == "RGBA":
        image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
        image.paste((*GREEN, 255), SQUARE)
        return image
    if mode == "P":
        image = Image.new("P", (40, 40), 0)
        image.putpalette([255, 255, 255, *GREEN])
        image.paste(1, SQUARE)
        return image
    image = Image.new("RGB", (40, 40), (255, 255, 255))
    image.paste(GREEN, SQUARE)
    return image


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_the_predictor_reads_any_image_mode_as_the_cli_does(predictor, monkeypatch, tmp_path, mode):
    rgb, image = green_square("RGB"), green_square(mode)
    image.save(tmp_path / "square.png")
    assert list(load_image(tmp_path / "square.png").getdata()) == list(rgb.getdata())  # the CLI's reading
    if mode == "P":  # read naively, the palette image is another picture
        assert not torch.equal(predictor.transform(image), predictor.transform(rgb))
    seen = []

    def spy(model, input_ids, attention_mask, pixel_values, *args, **kwargs):
        seen.append(pixel_values)
        return generate(model, input_ids, attention_mask, pixel_values, *args, **kwargs)

    monkeypatch.setattr(predict, "generate", spy)
    answers = [predictor.predict([x], "vqa", ["what color is it?"])[0] for x in (rgb, image)]
    replies = [predictor.chat([ask("what color is it?", x)]) for x in (rgb, image)]
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])
    assert answers[0] == answers[1] and replies[0] == replies[1]


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "robot", "content": "hi"}], "unknown role"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "unknown part type"),
        ([{"role": "user", "content": "<image> hi"}], "image"),
        ([{"role": "user", "content": [{"type": "image", "image": "/no/such.png"}]}], "no such image"),
    ],
)
def test_bad_messages_are_refused_with_the_reason(predictor, messages, match):
    with pytest.raises(InputError, match=match):
        predictor.chat(messages)


class Terminal:
    """A command run in a pseudo-terminal, as a person at a keyboard would run it."""

    def __init__(self, args):
        self.master, slave = pty.openpty()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        self.process = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
        )
        os.close(slave)
        self.seen = b""

    def read_until(self, marker: bytes, timeout: float = 180) -> bytes:
        """Output up to and including the next ``marker``."""
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"no {marker!r} within {timeout}s; output so far: {self.seen!r}")
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # the other side closed
                chunk = b""
            if not chunk:
                raise EOFError(f"ended before {marker!r}; output: {self.seen!r}")
            self.seen += chunk
        head, _, self.seen = self.seen.partition(marker)
        return head + marker

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        code = self.process.wait(timeout=60)
        os.close(self.master)
        return code


def test_vlm_chat_in_a_terminal_keeps_the_history(model_dir, predictor, tmp_path):
    red().save(tmp_path / "red.png")
    command = ["chat", "--model", str(model_dir), str(tmp_path / "red.png"), "--max-new-tokens", "32"]
    term = Terminal([sys.executable, "-m", "vlm.cli", *command])  # the Predictor's 32 tokens
    try:
        assert b"1 image(s) attached" in term.read_until(b"you> ")
        replies = []
        for question in ("what is on the left?", "what color is it?"):
            term.type(question + "\n")
            out = term.read_until(b"you> ").decode()
            replies.append(re.search(r"vlm> (.*?)\r?\n", out).group(1).strip())
        term.type("\x04")  # Ctrl-D: the end of input
        assert term.close() == 0
    finally:
        if term.process.poll() is None:
            term.process.kill()
    first = [ask("what is on the left?", red())]
    assert replies[0] == predictor.chat(first)
    history = [*first, {"role": "assistant", "content": replies[0]}, ask("what color is it?")]
    assert replies[1] == predictor.chat(history)  # the second turn was asked with the first
    assert replies[1] != predictor.chat([ask("what color is it?", red())])  # and depends on it
