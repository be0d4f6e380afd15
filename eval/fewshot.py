"""Few-shot evaluation on interleaved documents: the last (image, text) pair of a held-out
document is the query, the ``K`` pairs before it its support examples, as open_flamingo
prompts (``<image>answer<image>answer...<image>``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from vlm.data.pipeline import ImageTextShards
from vlm.eval.predict import InputError, Predictor, batched
from vlm.processor import IMAGE_TOKEN


def fewshot_accuracy(
    predictor: Predictor,
    data: str,
    *,
    shots: Sequence[int] = (0, 1, 2, 4),
    limit: int | None = None,
    batch_size: int = 32,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Exact match of the query's text at each number of support examples.

    Args:
        data: shards of documents ``"<image>text<image>text..."`` with at least
            ``max(shots) + 1`` images, each followed by its text.

    Returns ``({"fewshot_accuracy": {"K": accuracy}, "documents": n}, records)``.
    """
    documents = []
    for sample in ImageTextShards(data, shuffle_shards=False, shuffle_buffer=0, rank=0, world_size=1):
        text = sample["text"].get("document")
        images = sample.get("images") or ([sample["image"]] if "image" in sample else [])
        chunks = text.split(IMAGE_TOKEN)[1:] if text else []
        if len(images) <= max(shots) or len(chunks) != len(images) or text.split(IMAGE_TOKEN)[0].strip():
            continue
        documents.append(
            {
                "key": sample["key"],
                "images": images,
                "answers": [c.strip() for c in chunks],
                "group": sample["text"].get("attribute"),
            }
        )
        if limit is not None and len(documents) >= limit:
            break
    if not documents:
        raise InputError(
            f"{data} holds no documents of (image, text) pairs with more than {max(shots)} images"
        )
    accuracy, records = {}, []
    with tqdm(total=len(documents) * len(shots), desc="eval few-shot", unit="query") as bar:
        for k in shots:
            correct = 0
            for chunk in batched(documents, batch_size):
                prompts = []
                for d in chunk:
                    support = range(len(d["images"]) - 1 - k, len(d["images"]) - 1)
                    prompt = "".join(f"{IMAGE_TOKEN}{d['answers'][i]}" for i in support) + IMAGE_TOKEN
                    prompts.append(([d["images"][i] for i in support] + [d["images"][-1]], prompt))
                for d, (images, prompt), prediction in zip(chunk, prompts, predictor.complete_batch(prompts)):
                    right = prediction == d["answers"][-1]
                    correct += right
                    records.append(
                        {
                            "name": d["key"],
                            "shots": k,
                            "prompt": prompt,
                            "images": images,
                            "answers": [d["answers"][-1]],
                            "prediction": prediction,
                            "correct": right,
                            "group": d["group"],
                        }
                    )
                bar.update(len(chunk))
            accuracy[str(k)] = correct / len(documents)
    return {"fewshot_accuracy": accuracy, "documents": len(documents)}, records
