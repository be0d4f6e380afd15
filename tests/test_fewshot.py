"""Few-shot prompting: support examples before the query, in the Predictor, the CLI and
evaluation; cached generation over several images and support examples stays exact."""

import json

import pytest
import tiny
import torch
from PIL import Image
from saved import save_tiny_model
from test_cli import run
from test_packing import tiny_model

from vlm.eval.conversation import conversation_accuracy
from vlm.eval.evaluate import evaluate_shots
from vlm.eval.fewshot import fewshot_accuracy
from vlm.eval.predict import InputError, Predictor, Shot
from vlm.generate import generate

COLOURS = [(220, 30, 30), (30, 70, 220), (30, 160, 50), (235, 205, 0)]


def square(i):
    return Image.new("RGB", (40, 40), COLOURS[i % len(COLOURS)])


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("model"), templates={"vqa": "{images}{question}"})
    return Predictor(model_dir, device="cpu")


@pytest.mark.parametrize("bridge", tiny.BRIDGES)
def test_cached_generation_with_support_examples_and_documents_equals_recomputing(bridge):
    model, proc = tiny_model(bridge, "llama")
    with torch.no_grad():  # varied tokens rather than one repeated
        for p in model.decoder.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    support = [("what color is it ?", "red"), ("what color is it ?", "blue")]
    rows = [
        proc.prompt_ids("vqa", question="what color is it ?", support=support),  # 3 images
        proc.document_prompt_ids("<image> red <image> blue <image>"),  # 3 images
        proc.prompt_ids("vqa", question="what color is it ?", num_images=2),  # 2 images
    ]
    batch = proc.pad([{"input_ids": r} for r in rows], side="left")
    pixels = torch.randn(8, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    args = (model, batch["input_ids"], batch["attention_mask"], pixels)
    cached = generate(*args, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(cached, generate(*args, max_new_tokens=8, eos_token_id=None, use_cache=False))
    assert any(len(set(row.tolist())) > 1 for row in cached)  # real sequences, not one token repeated


def test_support_examples_come_before_the_query_with_their_images(predictor):
    shots = [Shot(square(1), "blue", "what color is it?"), Shot(square(2), "green", "what color is it?")]
    answer = predictor.predict([square(0)], "vqa", ["what color is it?"], support=[shots])
    # The same prompt by hand: the shots as trained (prompt, answer, EOS), then the query.
    proc = predictor.processor
    ids = proc.prompt_ids(
        "vqa", question="what color is it?", support=[(s.question, s.answer) for s in shots]
    )
    assert ids.count(predictor.model.image_token_id) == 3 * predictor.model.tokens_per_image
    pixels = torch.stack([predictor.transform(square(i)) for i in (1, 2, 0)])
    new = generate(predictor.model, torch.tensor([ids]), None, pixels, predictor.generation)
    assert answer == [predictor.tokenizer.decode(new[0], skip_special_tokens=True).strip()]
    # The support examples matter: other answers or other images give another answer.
    assert answer != predictor.predict([square(0)], "vqa", ["what color is it?"])
    swapped = [Shot(square(3), "blue", "what color is it?"), shots[1]]
    other = predictor.predict([square(0)], "vqa", ["what color is it?"], support=[swapped])
    assert other != answer


def test_a_batch_with_support_equals_one_by_one(predictor):
    shots = [[Shot(square(1), "blue", "what color is it?")], [Shot(square(3), "yellow", "where is it?")]]
    queries = [square(0), square(2)]
    together = predictor.predict(queries, "vqa", ["what color is it?", "where is it?"], support=shots)
    alone = [
        predictor.predict([q], "vqa", [question], support=[s])[0]
        for q, question, s in zip(queries, ["what color is it?", "where is it?"], shots)
    ]
    assert together == alone


def test_evaluation_at_several_shots_draws_reproducibly(predictor, shapes_dir, tmp_path):
    test, support = str(shapes_dir / "test"), str(shapes_dir / "val")
    first = evaluate_shots(
        None, test, "vqa", tmp_path / "a", shots=[0, 1, 2], support=support, predictor=predictor, limit=12
    )
    again = evaluate_shots(
        None, test, "vqa", tmp_path / "b", shots=[2], support=support, predictor=predictor, limit=12
    )
    assert again["shots"]["2"] == first["shots"]["2"]
    assert sorted(first["shots"]) == ["0", "1", "2"]
    assert all(m["questions"] == 12 for m in first["shots"].values())
    assert (tmp_path / "a" / "2-shot" / "predictions.jsonl").read_text() == (
        tmp_path / "b" / "2-shot" / "predictions.jsonl"
    ).read_text()
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == first
    with pytest.raises(InputError, match="--support"):
        evaluate_shots(None, test, "vqa", tmp_path / "c", shots=[0, 2], support=None, predictor=predictor)


def test_vqa_and_eval_commands_take_support_examples(predictor, shapes_dir, tmp_path, capsys):
    model_dir = str(predictor.model_dir)
    for i in range(3):
        square(i).save(tmp_path / f"{i}.png")
    support = [
        {"image": f"{i}.png", "question": "what color is it?", "answer": c}
        for i, c in ((1, "blue"), (2, "green"))
    ]
    (tmp_path / "support.jsonl").write_text("\n".join(json.dumps(s) for s in support))
    args = ["vqa", str(tmp_path / "0.png"), "--model", model_dir, "--question", "what color is it?"]
    code, out, _ = run([*args, "--support", str(tmp_path / "support.jsonl"), "--shots", "1"], capsys)
    shots = [Shot(square(1), "blue", "what color is it?")]
    expected = predictor.predict([square(0)], "vqa", ["what color is it?"], support=[shots])[0]
    assert code == 0 and json.loads(out)["prediction"] == expected
    code, _, err = run([*args, "--support", str(tmp_path / "nothing.jsonl")], capsys)
    assert code == 2 and "nothing.jsonl" in err
    code, out, _ = run(
        [
            "eval",
            "--task",
            "vqa",
            "--model",
            model_dir,
            "--data",
            str(shapes_dir / "test"),
            "--out",
            str(tmp_path / "e"),
        ]
        + ["--shots", "0,1", "--support", str(shapes_dir / "val"), "--limit", "4"],
        capsys,
    )
    assert code == 0 and "0-shot vqa_accuracy" in out and "1-shot vqa_accuracy" in out


def test_conversations_are_evaluated_with_the_models_own_replies(predictor, shapes_dir):
    data = str(shapes_dir / "conversations" / "test")
    metrics, records = conversation_accuracy(predictor, data, history="own")
    assert metrics["conversations"] == 8 and metrics["turns"] == sum(r["turn"] > 1 for r in records)
    dependent = [r for r in records if r["depends"]]
    assert metrics["conversation_accuracy"] == sum(r["correct"] for r in dependent) / len(dependent)
    # The second turn was asked after the model's own first reply, with the image in turn one.
    first, second = (
        next(r for r in records if r["name"] == records[0]["name"] and r["turn"] == t) for t in (1, 2)
    )
    assert second["history"][-1] == f"assistant: {first['prediction']}"
    history = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": first["image"]},
                {"type": "text", "text": first["question"]},
            ],
        },
        {"role": "assistant", "content": first["prediction"]},
        {"role": "user", "content": second["question"]},
    ]
    assert predictor.chat(history) == second["prediction"]
    # With the reference history (the default), turn two sees the reference reply instead.
    _, reference = conversation_accuracy(predictor, data)
    second = next(r for r in reference if r["name"] == records[0]["name"] and r["turn"] == 2)
    assert second["history"][-1] == f"assistant: {first['answers'][0]}"
    with pytest.raises(ValueError, match="history"):
        conversation_accuracy(predictor, data, history="gold")


def test_few_shot_documents_put_the_k_examples_before_the_query(predictor, shapes_dir):
    metrics, records = fewshot_accuracy(predictor, str(shapes_dir / "documents" / "test"), shots=(0, 1, 4))
    assert sorted(metrics["fewshot_accuracy"]) == ["0", "1", "4"] and metrics["documents"] == 8
    for k in (0, 1, 4):
        at_k = [r for r in records if r["shots"] == k]
        assert len(at_k) == 8 and all(r["prompt"].count("<image>") == k + 1 == len(r["images"]) for r in at_k)
        assert metrics["fewshot_accuracy"][str(k)] == sum(r["correct"] for r in at_k) / 8
    record = next(r for r in records if r["shots"] == 4)
    assert predictor.complete(record["images"], record["prompt"]) == record["prediction"]
    with pytest.raises(InputError, match="no documents"):
        fewshot_accuracy(predictor, str(shapes_dir / "test"))
