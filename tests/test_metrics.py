"""Metrics against values computed by hand, and the official VQA answer normalization."""

import math

import pytest

from vlm.eval.captions import caption_metrics, tokenize
from vlm.eval.vqa import normalize_prediction, process_punctuation, vqa_accuracy, vqa_score


def test_bleu_and_rouge_by_hand():
    m = caption_metrics(["the cat sat"], [["the cat sat on the mat"]], meteor=False)
    # every 1-, 2- and 3-gram matches; brevity penalty exp(1 - 6/3)
    for n in (1, 2, 3):
        assert m[f"bleu{n}"] == pytest.approx(math.exp(-1), abs=1e-6)
    assert m["bleu4"] < 0.05  # no 4-gram at all
    # ROUGE-L: LCS 3, precision 3/3, recall 3/6, F with beta 1.2
    p, r, b = 1.0, 0.5, 1.2
    assert m["rouge_l"] == pytest.approx((1 + b**2) * p * r / (r + b**2 * p), abs=1e-6)
    assert "spice" in m["skipped"]


def test_cider_by_hand():
    # Distinct captions predicted exactly: every n-gram is rare (idf log 2), cosine 1 for n = 1..4.
    four_words = caption_metrics(
        ["a red round circle", "two small blue squares"],
        [["a red round circle"], ["two small blue squares"]],
        meteor=False,
    )
    assert four_words["cider"] == pytest.approx(10.0, abs=1e-6)
    assert four_words["bleu4"] == pytest.approx(1.0, abs=1e-6)
    # three words have no 4-gram: that order scores 0, so 10 * 3/4
    three_words = caption_metrics(
        ["a red circle", "two blue squares"], [["a red circle"], ["two blue squares"]], meteor=False
    )
    assert three_words["cider"] == pytest.approx(7.5, abs=1e-6)
    wrong = caption_metrics(
        ["two blue squares", "a red circle"], [["a red circle"], ["two blue squares"]], meteor=False
    )
    assert wrong["cider"] == pytest.approx(0.0, abs=1e-9)


def test_caption_tokenization_drops_punctuation_and_case():
    assert tokenize("A red circle, on the LEFT.") == "a red circle on the left"


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two dogs.", "2 dogs"),
        ("The cat", "cat"),
        ("an apple", "apple"),
        ("dont know", "don't know"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("red-orange", "red orange"),
        ("yes!", "yes"),
        ("none", "0"),
        ("  Yes\n", "yes"),
    ],
)
def test_official_prediction_normalization(raw, normalized):
    assert normalize_prediction(raw) == normalized


def test_punctuation_touching_a_space_is_deleted():
    assert process_punctuation("a - b") == "a  b"
    assert process_punctuation("a-b") == "a b"


def test_vqa_score_by_hand():
    answers = ["2"] * 3 + ["3"] * 7
    # 7 leave-one-out subsets keep 3 matches (score 1), 3 keep 2 (score 2/3): (7 + 2) / 10
    assert vqa_score("two", answers) == pytest.approx(0.9)
    answers = ["2"] * 2 + ["3"] * 8
    # 8 subsets keep 2 matches (2/3), 2 keep 1 (1/3): (16/3 + 2/3) / 10
    assert vqa_score("2", answers) == pytest.approx(0.6)
    assert vqa_score("4", answers) == 0.0
    assert vqa_score("Two", ["2"]) == 1.0  # a single answer: exact match after normalization
    assert vqa_score("the red one", ["red one"]) == 1.0


def test_vqa_accuracy_is_a_mean_in_unit_range():
    assert vqa_accuracy(["yes", "no"], [["yes"] * 10, ["yes"] * 10]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        vqa_accuracy(["yes"], [])
    with pytest.raises(ValueError):
        vqa_score("yes", [])
