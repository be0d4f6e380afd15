"""Evaluation runs: predictions over shards, metrics, a gallery; or scores of a predictions file."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlm.data.decode import DecodeStats
from vlm.data.loader import task_examples
from vlm.eval.captions import caption_metrics
from vlm.eval.gallery import write_gallery
from vlm.eval.predict import InputError, Predictor, batched, read_inputs
from vlm.eval.vqa import vqa_accuracy, vqa_score

TASKS = ("caption", "vqa")


def score(task: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of prediction records (``prediction`` + ``references`` or ``answers``)."""
    if task not in TASKS:
        raise InputError(f"--task must be one of {TASKS}, got {task!r}")
    if not records:
        raise InputError("no predictions to score")
    key = "references" if task == "caption" else "answers"
    missing = [i for i, r in enumerate(records) if "prediction" not in r or not r.get(key)]
    if missing:
        raise InputError(f"record {missing[0] + 1} lacks 'prediction' or a non-empty '{key}' list")
    predictions = [str(r["prediction"]) for r in records]
    if task == "vqa":
        return {
            "vqa_accuracy": vqa_accuracy(predictions, [r["answers"] for r in records]),
            "questions": len(records),
        }
    metrics = caption_metrics(predictions, [r["references"] for r in records])
    metrics["captions"] = len(records)
    return metrics


def score_by_group(task: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`score` overall, plus per ``group`` when records carry one."""
    metrics = score(task, records)
    groups: dict[str, list] = defaultdict(list)
    for record in records:
        if record.get("group"):
            groups[record["group"]].append(record)
    if len(groups) > 1:
        metrics["groups"] = {name: score(task, members) for name, members in sorted(groups.items())}
    return metrics


def _examples(items, task: str, group: Callable | None) -> Iterator[dict[str, Any]]:
    for item in items:
        for example in task_examples(item.text, [task]):
            yield {
                "name": item.name,
                "image": item.image,
                **example,
                "group": group(item.text) if group else None,
            }


@dataclass
class Evaluation:
    """What an evaluation run produced: its metrics, every prediction record, and the first
    few records with their images (the gallery)."""

    metrics: dict[str, Any]
    records: list[dict[str, Any]]
    gallery: list[dict[str, Any]] = field(default_factory=list)
    inputs: DecodeStats = field(default_factory=DecodeStats)  # samples read, and skipped by reason


def evaluate(
    model_dir: str,
    data: str,
    task: str,
    out_dir: str | Path,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    gallery_size: int = 48,
    device: str = "auto",
    group: Callable[[dict], str] | None = None,
    predictor: Predictor | None = None,
) -> Evaluation:
    """Predicts on every example of ``data`` for ``task``; writes ``predictions.jsonl`` (as it
    goes, so an interrupted run keeps its predictions), ``metrics.json`` and ``gallery.html`` to
    ``out_dir``. Unreadable samples are skipped and counted (``Evaluation.inputs``).

    Args:
        limit: evaluate at most this many examples.
        group: names a group for each sample's text; metrics are also given per group.
        predictor: a loaded model to reuse (otherwise ``model_dir`` is loaded).
    """
    if task not in TASKS:
        raise InputError(f"--task must be one of {TASKS}, got {task!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = predictor or Predictor(model_dir, device=device)
    records, shown, inputs = [], [], DecodeStats()
    examples = _examples(read_inputs([data], inputs), task, group)
    with (
        (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as written,
        tqdm(desc=f"eval {task}", unit="example", total=limit) as bar,
    ):
        for chunk in batched(examples, batch_size):
            if limit is not None:
                chunk = chunk[: limit - len(records)]
            texts = predictor.predict([e["image"] for e in chunk], task, [e.get("question") for e in chunk])
            for example, prediction in zip(chunk, texts):
                record = {k: example.get(k) for k in ("name", "question", "references", "answers", "group")}
                record = {k: v for k, v in record.items() if v is not None}
                record["prediction"] = prediction
                records.append(record)
                written.write(json.dumps(record) + "\n")
                if len(shown) < gallery_size:
                    correct = vqa_score(prediction, example["answers"]) >= 1.0 if task == "vqa" else None
                    shown.append({**record, "image": example["image"], "correct": correct})
            written.flush()
            bar.update(len(chunk))
            if limit is not None and len(records) >= limit:
                break
    examples.close()  # stopped early (limit): the shard reader adds its counts to ``inputs`` now
    if not records:
        raise InputError(f"{data} holds no {task} examples")
    metrics = score_by_group(task, records)
    metrics["inputs"] = inputs.as_dict()
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    headline = {k: v for k, v in metrics.items() if isinstance(v, float)}
    write_gallery(out_dir / "gallery.html", f"{task} on {data}", shown, headline)
    return Evaluation(metrics, records, shown, inputs)


def score_file(predictions: str, task: str, out_dir: str | Path) -> dict[str, Any]:
    """Scores a JSONL of predictions made by any model; writes ``out_dir/metrics.json``."""
    path = Path(predictions)
    if not path.is_file():
        raise InputError(f"--predictions {predictions}: no such file")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise InputError(f"{predictions}, line {number}: not JSON ({err.msg})") from err
    metrics = score_by_group(task, records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
