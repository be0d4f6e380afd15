"""Multi-turn evaluation: the model answers each user turn of held-out conversations, after
either the reference replies to the earlier turns (as CoQA scores: each turn measures how the
model uses the conversation so far) or its own (what a person chatting with it sees, where one
wrong reply can make the next one wrong too)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image
from tqdm import tqdm

from vlm.data.pipeline import ImageTextShards
from vlm.eval.predict import InputError, Predictor, batched
from vlm.processor import IMAGE_TOKEN


def as_parts(content: str, images: Iterator[Image.Image]) -> list[dict[str, Any]]:
    """A shard's message content (``<image>`` markers) in transformers' parts form."""
    parts: list[dict[str, Any]] = []
    for k, text in enumerate(content.split(IMAGE_TOKEN)):
        if k:
            parts.append({"type": "image", "image": next(images)})
        if text.strip():
            parts.append({"type": "text", "text": text.strip()})
    return parts


def conversation_accuracy(
    predictor: Predictor,
    data: str,
    *,
    depends: Callable[[str], bool] | None = None,
    history: str = "reference",
    limit: int | None = None,
    batch_size: int = 32,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Exact match of the replies to the turns that depend on earlier ones.

    Args:
        data: shards of conversations (``{"messages": ...}``).
        depends: which user questions refer back to the conversation so far (default: every
            turn after the first).
        history: ``"reference"``: earlier turns carry the reference replies; ``"own"``: the
            model's own replies.
        limit: at most this many conversations.

    Returns ``({"conversation_accuracy", "turn_accuracy" (every turn), "turns", "conversations"},
    records)``; a record per turn holds the question, the history shown, the reference and the
    prediction.
    """
    if history not in ("reference", "own"):
        raise ValueError(f"history must be 'reference' or 'own', got {history!r}")
    conversations = []
    for sample in ImageTextShards(data, shuffle_shards=False, shuffle_buffer=0, rank=0, world_size=1):
        if "messages" not in sample["text"]:
            continue
        images = iter(sample.get("images") or ([sample["image"]] if "image" in sample else []))
        messages = [{**m, "content": as_parts(m["content"], images)} for m in sample["text"]["messages"]]
        turns = _user_turns(messages)
        conversations.append(
            {"key": sample["key"], "turns": turns, "image": sample.get("image"), "history": []}
        )
        if limit is not None and len(conversations) >= limit:
            break
    if not conversations:
        raise InputError(f"{data} holds no conversations")
    records = []
    longest = max(len(c["turns"]) for c in conversations)
    with tqdm(total=sum(len(c["turns"]) for c in conversations), desc="eval chat", unit="turn") as bar:
        for turn in range(longest):
            asking = [c for c in conversations if turn < len(c["turns"])]
            for chunk in batched(asking, batch_size):
                prompts = []
                for c in chunk:
                    c["history"].append(c["turns"][turn][0])
                    prompts.append(list(c["history"]))
                replies = predictor.chat_batch(prompts)
                for c, reply in zip(chunk, replies):
                    question, reference = c["turns"][turn]
                    text = " ".join(p["text"] for p in question["content"] if p["type"] == "text")
                    records.append(
                        {
                            "name": c["key"],
                            "turn": turn + 1,
                            "question": text,
                            "history": [_plain(m) for m in c["history"][:-1]],
                            "answers": [reference],
                            "prediction": reply,
                            "correct": reply == reference,
                            "depends": depends(text) if depends else turn > 0,
                            "image": c["image"],
                        }
                    )
                    shown = reply if history == "own" else reference
                    c["history"].append({"role": "assistant", "content": shown})
                bar.update(len(chunk))
    dependent = [r for r in records if r["depends"]]
    metrics = {
        "conversation_accuracy": sum(r["correct"] for r in dependent) / max(1, len(dependent)),
        "turn_accuracy": sum(r["correct"] for r in records) / len(records),
        "turns": len(dependent),
        "conversations": len(conversations),
    }
    return metrics, records


def _user_turns(messages: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """(user message, the reference reply after it) pairs."""
    pairs = []
    for i, message in enumerate(messages):
        if message["role"] == "user":
            reply = next((m for m in messages[i + 1 :] if m["role"] == "assistant"), None)
            if reply is not None:
                text = " ".join(p["text"] for p in reply["content"] if p["type"] == "text")
                pairs.append((message, text))
    return pairs


def _plain(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return f"{message['role']}: {content}"
    return f"{message['role']}: " + " ".join(p.get("text", "[image]") for p in content)
