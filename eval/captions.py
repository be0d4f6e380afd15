"""Caption metrics with pycocoevalcap's scorers: BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR with Java).

Texts are tokenized in Python the way the COCO evaluation's PTB tokenizer leaves them for the
scorers: lowercased, punctuation split off and dropped. SPICE needs Stanford CoreNLP models
that are downloaded on first use, so it is not computed; the result says so.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

_TOKENS = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
_DROPPED = {
    "''",
    "'",
    "``",
    "`",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
}


def tokenize(text: str) -> str:
    """Lowercase words, punctuation removed, single spaces."""
    return " ".join(t for t in _TOKENS.findall(text.lower()) if t not in _DROPPED)


def caption_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, meteor: bool | None = None
) -> dict[str, float | str]:
    """Corpus scores of predicted captions against their reference captions.

    Args:
        meteor: compute METEOR (runs Java); ``None`` = when ``java`` is on the PATH.

    Returns ``bleu1``..``bleu4``, ``rouge_l``, ``cider`` (CIDEr-D, x10 as published), ``meteor``
    when computed, and ``skipped``: the metrics not computed and why.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    if not predictions:
        raise ValueError("no captions to score")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference caption")
    res = {i: [tokenize(p)] for i, p in enumerate(predictions)}
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics: dict[str, float | str] = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    metrics["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    metrics["cider"] = float(Cider().compute_score(gts, res)[0])
    skipped = ["spice (needs Stanford CoreNLP models, downloaded on first use)"]
    java = shutil.which("java") is not None
    if meteor or (meteor is None and java):
        scorer = Meteor()
        try:
            metrics["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            scorer.close() if hasattr(scorer, "close") else None
    else:
        skipped.append("meteor (needs Java)")
    metrics["skipped"] = "; ".join(skipped)
    return metrics
