"""What the commands say about their inputs: a glob that matches nothing, more shots than the
support file holds, an unknown chat command, data that is there already, the tasks of every
kind of shard."""

import io
import json

import pytest
from PIL import Image
from test_cli import run

from vlm.eval.chat import chat_loop


@pytest.fixture
def fake_model(tmp_path):
    """A directory that passes the commands' first check (it holds weights) and could not load:
    whatever fails on it failed before any model was built."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    return model


@pytest.fixture
def support(tmp_path):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "red.png")
    path = tmp_path / "support.jsonl"
    path.write_text("\n".join(json.dumps({"image": "red.png", "answer": a}) for a in ("red", "a red one")))
    return path


def test_more_shots_than_the_support_file_holds_is_an_error(fake_model, support, capsys):
    image = str(support.parent / "red.png")
    code, _, err = run(
        ["caption", image, "--model", str(fake_model), "--support", str(support), "--shots", "3"], capsys
    )
    assert code == 2 and f"--shots 3: the support file {support} holds 2 example(s)" in err
    code, _, err = run(["caption", image, "--model", str(fake_model), "--shots", "1"], capsys)
    assert code == 2 and "--shots 1 takes its examples from --support FILE" in err


def test_a_glob_that_matches_nothing_is_named(shapes_dir, tmp_path, capsys):
    missing = str(tmp_path / "typo" / "*.tar")
    code, _, err = run(["data", "check", str(shapes_dir / "test"), missing], capsys)
    assert code == 2 and f"no shard file matches the glob {missing!r}" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(["data", "check", str(shapes_dir / "test"), str(tmp_path / "empty")], capsys)
    assert code == 2 and "no shard (*.tar) in the directory" in err


def test_data_check_counts_the_examples_of_every_task(shapes_dir, capsys):
    counts = json.loads((shapes_dir / "shapes.json").read_text())["counts"]
    reports = {}
    for shards in ("conversations/train", "documents/train", "train"):
        code, out, _ = run(["data", "check", str(shapes_dir / shards), "--json"], capsys)
        assert code == 0
        reports[shards] = json.loads(out.splitlines()[-1])["tasks"]
    assert reports["conversations/train"] == {
        "caption": 0,
        "vqa": 0,
        "chat": counts["conversations/train"],
        "document": 0,
    }
    assert reports["documents/train"]["document"] == counts["documents/train"]
    assert reports["train"]["caption"] == counts["train"] and reports["train"]["vqa"] > counts["train"]
    code, out, _ = run(["data", "check", str(shapes_dir / "documents/train")], capsys)
    assert f"examples per task: caption 0, vqa 0, chat 0, document {counts['documents/train']}" in out


def test_data_shapes_says_it_skips_what_is_there(tmp_path, capsys):
    args = ["data", "shapes", "--out", str(tmp_path / "s"), "--train", "6", "--val", "2", "--test", "2"]
    code, out, err = run([*args, "--image-size", "32"], capsys)
    assert code == 0 and "skipping" not in err
    code, out, err = run([*args, "--image-size", "32"], capsys)
    assert code == 0 and "already holds this dataset (same arguments): skipping" in err
    assert json.loads(out.splitlines()[-1])["counts"]["train"] == 6


class Replies:
    """A predictor stand-in that answers "ok" and keeps what it was sent."""

    def __init__(self):
        self.sent = []

    def chat(self, history, on_text=None):
        self.sent.append(history[-1]["content"][-1]["text"])
        return "ok"


def test_chat_refuses_an_unknown_command_instead_of_sending_it():
    lines = iter(["/imagine a cat", "//etc/hosts is a file", "/help", "hello", "/quit", "never read"])
    predictor, out = Replies(), io.StringIO()
    code = chat_loop(predictor, [], read=lambda prompt: next(lines), out=out)
    assert code == 0 and predictor.sent == ["/etc/hosts is a file", "hello"]
    text = out.getvalue()
    assert "(unknown command /imagine, not sent; /image PATH attaches" in text
    assert text.count("/help shows this") == 3  # the banner, the unknown command, /help
