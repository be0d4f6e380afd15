"""The command line: captions, answers and evaluations; bad input ends with one clear message."""

import json

import pytest
from PIL import Image
from test_train import tiny_recipe

from train.recipe import recipe_from_dict
from train.trainer import train
from vlm.cli import main


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
    "make_input, message",
    [
        (lambda d: d / "missing.png", "no such file"),
        (lambda d: (d / "fake.png").write_text("hello") and d / "fake.png", "not a readable image"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "holds no images"),
    ],
)
def test_bad_images_end_with_one_message(model_dir, tmp_path, capsys, make_input, message):
    path = make_input(tmp_path)
    code, _, err = run(["caption", str(path), "--model", model_dir], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_model_dir_without_weights(images, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    code, _, err = run(["caption", str(images), "--model", str(tmp_path / "model")], capsys)
    assert code == 2 and "holds no weights" in err
    code, _, err = run(["caption", str(images), "--model", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "no such directory" in err


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
    assert code == 0 and manifest["counts"] == {"train": 8, "val": 2, "test": 2}
    assert json.loads(out.splitlines()[-1])["counts"]["train"] == 8
