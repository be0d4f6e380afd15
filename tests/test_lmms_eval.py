"""lmms-eval evaluates a vlm model through eval/lmms.py (the ``lmms`` extra): its real CLI, offline,
on a task folder written here, gives Predictor's replies and the score vlm's own VQA accuracy
gives them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from saved import save_tiny_model

from vlm.eval.predict import Predictor
from vlm.eval.vqa import normalize_prediction, vqa_accuracy, vqa_score
from vlm.generate import GenerationConfig

pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed: pip install -c constraints.txt -e '.[lmms]'"
)

from vlm.eval.lmms import VLMEval  # noqa: E402  (needs lmms_eval)

TASK = "vlm_shapes_vqa"
MAX_NEW_TOKENS = 8
ITEMS = [  # (colour of the image, question)
    ("red", "what color is the shape?"),
    ("green", "what shape is on the left?"),
    ("blue", "is there a circle?"),
    ("yellow", "how many shapes are there?"),
    ("purple", "what is on the right?"),
]
# How many of each item's 10 human answers are the model's reply: VQA accuracy 1, 1, 0.6, 0.3, 0.
MATCHING = [10, 4, 2, 1, 0]
OTHER_ANSWER = "unanswerable"

# The task as lmms-eval's own tasks are written: a YAML, and utils.py for what YAML cannot say.
# The score is lmms-eval's VQAv2 accuracy (its own answer normalization), not vlm's.
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: {until}
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = """\
from pathlib import Path

from PIL import Image
from lmms_eval.tasks.vqav2.utils import vqav2_process_results_val as process_results


def doc_to_visual(doc):
    return [Image.open(Path(__file__).parent / doc["image"]).convert("RGB")]
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("lmms-model"))


def write_task(folder: Path, answers: list[list[str]], until: list[str]) -> None:
    (folder / "images").mkdir(parents=True)
    with open(folder / "data.jsonl", "w") as f:
        for i, ((colour, question), human) in enumerate(zip(ITEMS, answers)):
            Image.new("RGB", (40, 32), colour).save(folder / "images" / f"{i}.png")
            doc = {
                "question_id": i,
                "image": f"images/{i}.png",
                "question": question,
                "answer": human[0],
                # VQAv2's answer ids: lmms-eval's leave-one-out drops the answers equal to the
                # one left out, so without ids it would drop all the identical ones.
                "answers": [{"answer": a, "answer_id": k} for k, a in enumerate(human, 1)],
            }
            f.write(json.dumps(doc) + "\n")
    yaml = TASK_YAML.format(
        task=TASK, data=folder / "data.jsonl", max_new_tokens=MAX_NEW_TOKENS, until=json.dumps(until)
    )
    (folder / f"{TASK}.yaml").write_text(yaml)
    (folder / "utils.py").write_text(TASK_UTILS)


def reply_of(sample: dict) -> str:
    reply = sample["filtered_resps"]
    while isinstance(reply, list):  # one reply per repeat, for some filters
        (reply,) = reply
    return reply


def test_lmms_eval_cli_logs_predictors_replies_and_vlms_vqa_accuracy(model_dir, tmp_path):
    predictor = Predictor(model_dir, device="cpu", generation=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS))
    full = []  # each reply alone, as lmms-eval's messages ask: the image, then the question
    for colour, question in ITEMS:
        image = Image.new("RGB", (40, 32), colour)
        content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
        full.append(predictor.chat([{"role": "user", "content": content}]))
    # A stop string from inside one reply, so that `until` really cuts it.
    words = max((reply.split() for reply in full), key=len)
    assert len(words) >= 3, f"the tiny model's replies are too short to cut: {full}"
    stop = " " + words[2]
    expected = [reply.split(stop)[0].rstrip() for reply in full]
    assert expected != full
    answers = [
        [normalize_prediction(reply)] * n + [OTHER_ANSWER] * (10 - n) for reply, n in zip(expected, MATCHING)
    ]
    task_dir, out = tmp_path / "task", tmp_path / "out"
    write_task(task_dir, answers, until=[stop, "\n\n"])

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "vlm",
        "--model_args", f"pretrained={model_dir},device=cpu",
        "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "2",
        "--log_samples", "--output_path", str(out),
        "--verbosity", "DEBUG",  # otherwise an error in the evaluation still exits 0
    ]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, log
    results = list(out.rglob("*_results.json"))
    samples = list(out.rglob(f"*_samples_{TASK}.jsonl"))
    assert len(results) == 1 and len(samples) == 1, f"lmms-eval wrote {results} and {samples}:\n{log}"

    logged = [json.loads(line) for line in samples[0].read_text().splitlines()]
    logged.sort(key=lambda sample: sample["doc_id"])
    assert [reply_of(s) for s in logged] == expected
    assert [s["exact_match"] for s in logged] == pytest.approx(
        [vqa_score(reply, human) for reply, human in zip(expected, answers)]
    )
    score = json.loads(results[0].read_text())["results"][TASK]["exact_match,none"]
    assert 0 < score < 1
    assert score == pytest.approx(vqa_accuracy(expected, answers))


def test_model_args_that_vlm_does_not_take_are_named(model_dir):
    with pytest.raises(ValueError, match=r"no model_args \['conv_template'\].*pretrained, device"):
        VLMEval(pretrained=str(model_dir), conv_template="vicuna_v1")
    with pytest.raises(ValueError, match="pretrained=DIR"):
        VLMEval()
    with pytest.raises(ValueError, match="not 'auto'"):
        VLMEval(pretrained=str(model_dir), batch_size="auto")
