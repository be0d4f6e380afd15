"""Evaluation runs: predictions over shards, metrics, a gallery; or scores of a predictions file."""

from __future__ import annotations

import json
import random
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
from vlm.eval.predict import InputError, Predictor, Shot, batched, read_inputs
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
    shots: int = 0,
    support: Sequence[Shot] = (),
    seed: int = 0,
) -> Evaluation:
    """Predicts on every example of ``data`` for ``task``; writes ``predictions.jsonl`` (as it
    goes, so an interrupted run keeps its predictions), ``metrics.json`` and ``gallery.html`` to
    ``out_dir``. Unreadable samples are skipped and counted (``Evaluation.inputs``).

    Args:
        limit: evaluate at most this many examples.
        group: names a group for each sample's text; metrics are also given per group.
        predictor: a loaded model to reuse (otherwise ``model_dir`` is loaded).
        shots, support, seed: few-shot prompting: each query gets ``shots`` examples drawn
            from ``support`` (see :func:`support_examples`) by a generator seeded with
            ``(seed, shots, query number)``, so every run draws the same ones.
    """
    if task not in TASKS:
        raise InputError(f"--task must be one of {TASKS}, got {task!r}")
    if shots and len(support) < shots:
        raise InputError(
            f"{shots}-shot evaluation needs at least {shots} support examples, got {len(support)}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = predictor or Predictor(model_dir, device=device)
    support = list(support)  # drawn from for every query
    records, shown, inputs = [], [], DecodeStats()
    examples = _examples(read_inputs([data], inputs), task, group)
    with (
        (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as written,
        tqdm(desc=f"eval {task}", unit="example", total=limit) as bar,
    ):
        for chunk in batched(examples, batch_size):
            if limit is not None:
                chunk = chunk[: limit - len(records)]
            drawn = [
                random.Random(f"{seed}:{shots}:{len(records) + i}").sample(support, shots) if shots else []
                for i in range(len(chunk))
            ]
            texts = predictor.predict(
                [e["image"] for e in chunk], task, [e.get("question") for e in chunk], support=drawn
            )
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


def support_examples(data: str, task: str, *, limit: int = 1000) -> list[Shot]:
    """Up to ``limit`` examples of ``task`` in ``data`` (shards, images...), the pool few-shot
    support examples are drawn from; as open_flamingo does, from another split than the queries."""
    pool: list[Shot] = []
    items = read_inputs([data])
    for item in items:
        for example in task_examples(item.text, [task]):
            pool.append(Shot(item.image, example["answer"], example.get("question")))
        if len(pool) >= limit:
            break
    items.close()
    if not pool:
        raise InputError(f"{data} holds no {task} examples to draw support examples from")
    return pool[:limit]


def evaluate_shots(
    model_dir: str,
    data: str,
    task: str,
    out_dir: str | Path,
    *,
    shots: Sequence[int],
    support: str | None,
    predictor: Predictor | None = None,
    **options: Any,
) -> dict[str, Any]:
    """:func:`evaluate` at each number of support examples in ``shots`` (``out_dir/K-shot/``);
    writes and returns ``{"shots": {"K": metrics}}`` (``out_dir/metrics.json``)."""
    if any(k < 0 for k in shots):
        raise InputError(f"--shots must be >= 0, got {list(shots)}")
    if any(shots) and not support:
        raise InputError("few-shot evaluation needs --support SHARDS (a split other than --data)")
    predictor = predictor or Predictor(model_dir, device=options.pop("device", "auto"))
    pool = support_examples(support, task) if any(shots) else []
    metrics: dict[str, Any] = {"shots": {}}
    for k in shots:
        run = evaluate(
            model_dir,
            data,
            task,
            Path(out_dir) / f"{k}-shot",
            predictor=predictor,
            shots=k,
            support=pool,
            **options,
        )
        metrics["shots"][str(k)] = run.metrics
    (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


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
