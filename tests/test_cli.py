"""The command line: captions, answers and evaluations; bad input ends with one clear message."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_data_pipeline import png, write_tar
from test_train import tiny_recipe

from vlm.cli import main
from vlm.eval.predict import Predictor
from vlm.schema import ConfigError
from vlm.train.recipe import recipe_from_dict
from vlm.train.trainer import train


@pytest.fixture(scope="module")
def model_dir(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(recipe_from_dict(tiny_recipe(shapes_dir, out, max_steps=2)), progress=False)["model"]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, color in enumerate([(220, 30, 30), (30, 70, 220), (30, 160, 50)]):
        Image.new("RGB", (40, 40), color).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image, and not picked up")
    return folder


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_caption_a_folder_to_jsonl(model_dir, images, tmp_path, capsys):
    out_file = tmp_path / "captions.jsonl"
    code, _, _ = run(["caption", str(images), "--model", model_dir, "--out", str(out_file)], capsys)
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert code == 0 and [r["image"].rsplit("/", 1)[1] for r in rows] == ["0.png", "1.png", "2.png"]
    assert all(isinstance(r["prediction"], str) for r in rows)


def test_vqa_on_files_and_shards_prints_jsonl(model_dir, images, shapes_dir, capsys):
    code, out, _ = run(
        [
            "vqa",
            str(images / "0.png"),
            str(shapes_dir / "test"),
            "--model",
            model_dir,
            "--question",
            "how many shapes are there?",
        ],
        capsys,
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 1 + 8  # an image file + the 8 test samples
    assert all(r["question"] == "how many shapes are there?" for r in rows)


@pytest.mark.parametrize(
    "make_input, reason",
    [
        (lambda d: d / "missing.png", "missing"),
        (lambda d: (d / "fake.png").write_text("hello") and d / "fake.png", "not_an_image"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no_images"),
    ],
)
def test_nothing_readable_ends_with_one_message_and_exit_2(
    model_dir, tmp_path, capsys, caplog, make_input, reason
):
    path = make_input(tmp_path)
    code, _, err = run(["caption", str(path), "--model", model_dir], capsys)
    assert code == 2 and "nothing could be read" in err and f"{reason} 1" in err
    assert len(err.strip().splitlines()) == 1
    assert f"skipping {path}: {reason}" in caplog.text  # the warning names the file


def write_mixed_folder(folder):
    """Two good images and one of each kind of bad file."""
    folder.mkdir()
    good = png(Image.new("RGB", (40, 40), (200, 40, 40)))
    (folder / "a-good.png").write_bytes(good)
    (folder / "b-empty.png").write_bytes(b"")
    (folder / "c-cut-header.png").write_bytes(good[:20])
    (folder / "d-cut-pixels.png").write_bytes(good[:-30])
    (folder / "e-text.jpg").write_text("not an image")
    Image.new("RGB", (40, 40), (40, 40, 200)).save(folder / "f-good.jpg")
    return {"empty": 1, "truncated": 2, "not_an_image": 1}


def test_a_mixed_folder_answers_the_good_files_and_exits_1(model_dir, tmp_path, capsys, caplog):
    skipped = write_mixed_folder(tmp_path / "mixed")
    out_file = tmp_path / "captions.jsonl"
    code, _, err = run(
        ["caption", str(tmp_path / "mixed"), "--model", model_dir, "--out", str(out_file)], capsys
    )
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert code == 1 and [Path(r["image"]).name for r in rows] == ["a-good.png", "f-good.jpg"]
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items()))
    assert f"2 answered; 4 input(s) skipped: {reasons}" in err
    assert caplog.text.count("skipping ") == 4
    # A missing path among good ones is one more skip, not the end of the run.
    code, out, err = run(
        [
            "vqa",
            str(tmp_path / "mixed" / "a-good.png"),
            str(tmp_path / "gone.png"),
            "--model",
            model_dir,
            "--question",
            "how many shapes are there?",
        ],
        capsys,
    )
    assert code == 1 and len(out.splitlines()) == 1 and "missing 1" in err


def test_answers_are_written_as_they_go(model_dir, images, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the second batch keeps the first batch's answers in the file."""
    real_predict, calls = Predictor.predict, []

    def interrupted_second_time(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_predict(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict", interrupted_second_time)
    out_file = tmp_path / "captions.jsonl"
    code, _, err = run(
        ["caption", str(images), "--model", model_dir, "--out", str(out_file), "--batch-size", "2"], capsys
    )
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert code == 130 and "interrupted" in err
    assert [Path(r["image"]).name for r in rows] == ["0.png", "1.png"]


def test_model_dir_without_weights(images, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    code, _, err = run(["caption", str(images), "--model", str(tmp_path / "model")], capsys)
    assert code == 2 and "holds no weights" in err
    code, _, err = run(["caption", str(images), "--model", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "no such directory" in err


def set_bridge_name(model):
    config = json.loads((model / "config.json").read_text())
    config["bridge"]["name"] = "mlp9x_gelu"
    (model / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (lambda m: (m / "model.safetensors").write_bytes(b"\x07" * 64), "model.safetensors", "is damaged"),
        (lambda m: (m / "model.safetensors").write_bytes(b""), "model.safetensors", "is damaged"),
        (lambda m: (m / "config.json").write_text('{"encoder": '), "config.json", "is not valid JSON"),
        (lambda m: (m / "config.json").write_text("[1, 2]"), "config.json", "not an object"),
        (set_bridge_name, "config.json", "unknown bridge 'mlp9x_gelu'"),
        (lambda m: (m / "tokenizer_config.json").unlink(), "", "no tokenizer in"),
        (lambda m: (m / "tokenizer.json").write_text("{not json"), "", "tokenizer"),
        (lambda m: (m / "tokenizer.json").unlink(), "", "no tokenizer.json in"),
    ],
    ids=[
        "garbage-weights",
        "empty-weights",
        "cut-config",
        "config-list",
        "unknown-part",
        "no-tokenizer",
        "bad-tokenizer",
        "no-tokenizer-json",
    ],
)
def test_a_broken_model_directory_gets_one_message(
    model_dir, images, tmp_path, capsys, damage, file, message
):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    damage(model)
    code, _, err = run(["caption", str(images), "--model", str(model)], capsys)
    assert code == 2 and message in err and str(model / file) in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match=message):  # --debug: the traceback, for a bug report
        main(["caption", str(images), "--model", str(model), "--debug"])


def test_eval_scores_any_models_predictions(tmp_path, capsys):
    captions = tmp_path / "captions.jsonl"
    captions.write_text(
        json.dumps({"prediction": "a red round circle", "references": ["a red round circle"]})
        + "\n"
        + json.dumps(
            {"prediction": "two small blue squares", "references": ["two small blue squares", "blue"]}
        )
        + "\n"
    )
    code, _, _ = run(
        ["eval", "--predictions", str(captions), "--task", "caption", "--out", str(tmp_path / "c")], capsys
    )
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert code == 0 and {"bleu1", "bleu4", "rouge_l", "cider"} <= set(metrics) and metrics["bleu1"] > 0.99

    answers = tmp_path / "vqa.jsonl"
    answers.write_text(
        json.dumps({"prediction": "Two", "answers": ["2"] * 10})
        + "\n"
        + json.dumps({"prediction": "no", "answers": ["yes"] * 10})
        + "\n"
    )
    code, _, _ = run(
        ["eval", "--predictions", str(answers), "--task", "vqa", "--out", str(tmp_path / "v")], capsys
    )
    assert code == 0 and json.loads((tmp_path / "v" / "metrics.json").read_text())["vqa_accuracy"] == 0.5

    answers.write_text(json.dumps({"prediction": "yes"}) + "\n")
    code, _, err = run(
        ["eval", "--predictions", str(answers), "--task", "vqa", "--out", str(tmp_path / "v")], capsys
    )
    assert code == 2 and "answers" in err


def test_eval_a_model_on_shards_writes_metrics_and_gallery(model_dir, shapes_dir, tmp_path, capsys):
    code, _, _ = run(
        [
            "eval",
            "--model",
            model_dir,
            "--data",
            str(shapes_dir / "test"),
            "--task",
            "vqa",
            "--out",
            str(tmp_path / "eval"),
        ],
        capsys,
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert code == 0 and 0.0 <= metrics["vqa_accuracy"] <= 1.0 and metrics["questions"] > 6
    gallery = (tmp_path / "eval" / "gallery.html").read_text()
    assert gallery.count("<img") > 0 and "Q: how many shapes are there?" in gallery
    predictions = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == metrics["questions"]


def test_eval_skips_bad_samples_counts_them_and_exits_1(model_dir, shapes_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(sorted((shapes_dir / "test").glob("*.tar"))[0], data / "good.tar")
    text = json.dumps({"question": "how many shapes are there?", "answers": ["2"]}).encode()
    cut = png(Image.new("RGB", (32, 32)))[:20]  # ends inside the header
    write_tar(data / "bad.tar", [{"__key__": "cut", "png": cut, "json": text}])
    out = tmp_path / "eval"
    code, _, err = run(
        ["eval", "--model", model_dir, "--data", str(data), "--task", "vqa", "--out", str(out)], capsys
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert code == 1 and "examples evaluated; 1 input(s) skipped: truncated 1" in err
    assert metrics["inputs"]["ok"] == 8 and metrics["inputs"]["skipped"] == {"truncated": 1}
    assert len((out / "predictions.jsonl").read_text().splitlines()) == metrics["questions"]


def test_data_commands(tmp_path, capsys, images):
    code, _, err = run(["data", "check", str(tmp_path / "none.tar")], capsys)
    assert code == 2 and "no shard" in err
    (tmp_path / "caps.jsonl").write_text(
        "\n".join(json.dumps({"image": f"{i}.png", "caption": "c"}) for i in range(3))
    )
    code, out, _ = run(
        [
            "data",
            "write",
            "--images",
            str(images),
            "--captions",
            str(tmp_path / "caps.jsonl"),
            "--out",
            str(tmp_path / "shards"),
        ],
        capsys,
    )
    assert code == 0 and "wrote 3 samples" in out
    code, out, _ = run(["data", "check", str(tmp_path / "shards"), "--json"], capsys)
    assert code == 0 and json.loads(out.splitlines()[-1])["ok"] == 3


def test_data_shapes_command(tmp_path, capsys):
    code, out, _ = run(
        [
            "data",
            "shapes",
            "--out",
            str(tmp_path / "s"),
            "--train",
            "8",
            "--val",
            "2",
            "--test",
            "2",
            "--image-size",
            "32",
        ],
        capsys,
    )
    manifest = json.loads((tmp_path / "s" / "shapes.json").read_text())
    assert code == 0 and {k: manifest["counts"][k] for k in ("train", "val", "test")} == {
        "train": 8,
        "val": 2,
        "test": 2,
    }
    assert manifest["counts"]["conversations/train"] == 2 and manifest["counts"]["documents/test"] == 2
    assert json.loads(out.splitlines()[-1])["counts"]["train"] == 8


def test_serve_refuses_a_directory_without_a_model(tmp_path, capsys):
    code, _, err = run(["serve", "--model", str(tmp_path)], capsys)
    assert code == 2 and "holds no weights" in err and len(err.strip().splitlines()) == 1
