"""The text of a sample, in the forms a shard's ``KEY.json`` may take.

- captions: ``{"caption": ...}`` or ``{"captions": [...]}``;
- questions: ``{"question", "answers"}`` or ``{"qa": [{"question", "answer(s)"}]}``;
- a conversation: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}]}``,
  the role/content form transformers' chat templates take;
- an interleaved document: ``{"document": "text <image> more text <image> ..."}``.

Captions and questions are about the sample's images as a whole; conversations and documents
place each image where its ``<image>`` marker stands, so they hold exactly one marker per image
(none for a text-only conversation).
"""

from __future__ import annotations

from typing import Any

from vlm.processor import IMAGE_TOKEN

ROLES = ("system", "user", "assistant")


def placed_images(text: dict[str, Any]) -> int | None:
    """The number of ``<image>`` markers of a conversation or document; ``None`` for text
    that does not place its images (captions, questions)."""
    if "messages" in text:
        return sum(str(m.get("content", "")).count(IMAGE_TOKEN) for m in text["messages"])
    if "document" in text:
        return str(text["document"]).count(IMAGE_TOKEN)
    return None


def check_messages(messages: Any) -> str | None:
    """Why ``messages`` is not a usable conversation (``None`` when it is): a list of
    ``{"role", "content"}`` with known roles, string contents and at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"message {i} needs a string 'content'"
        if message.get("role") not in ROLES:
            return f"message {i} has role {message.get('role')!r}; roles are {ROLES}"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn to learn from"
    return None
