"""Conversations as text: the pieces a multi-turn chat renders to, and which of them are learned.

A template turns role/content messages (the form transformers' chat templates take) into
``(text, labelled)`` pieces; the processor tokenizes each piece on its own, so training and
generation see the very same tokens for the same history. ``EOS`` stands for the tokenizer's
end-of-sequence token, whatever its spelling.

- ``chat_template``: the tokenizer's own Jinja template, rendered once per assistant turn to
  find where each turn starts and ends;
- ``plain``: LLaVA's stage 1: each user turn is only its images, each assistant turn its text
  and ``EOS`` (a caption right after the image);
- ``vicuna_v1``: LLaVA-1.5's stage 2: ``SYSTEM USER: ... ASSISTANT: ...</s>USER: ...``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlm.schema import ConfigError

EOS = None  # a piece holding the tokenizer's EOS token
Piece = tuple[str | None, bool]  # (text or EOS, whether it is a label)
Message = dict[str, Any]

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _plain(
    messages: Sequence[Message], image_token: str, *, add_generation_prompt: bool, tokenizer
) -> list[Piece]:
    pieces: list[Piece] = []
    for message in messages:
        if message["role"] == "user":
            pieces.append((image_token * message["content"].count(image_token), False))
        elif message["role"] == "assistant":
            pieces += [(message["content"].strip(), True), (EOS, True)]
    return pieces


def _vicuna_v1(
    messages: Sequence[Message], image_token: str, *, add_generation_prompt: bool, tokenizer
) -> list[Piece]:
    system = next((m["content"] for m in messages if m["role"] == "system"), VICUNA_SYSTEM)
    pieces: list[Piece] = [(system + " ", False)]
    for message in messages:
        if message["role"] == "user":
            pieces.append((f"USER: {message['content']} ", False))
        elif message["role"] == "assistant":
            pieces += [("ASSISTANT:", False), (message["content"].strip(), True), (EOS, True)]
    if add_generation_prompt:
        pieces.append(("ASSISTANT:", False))
    return pieces


def chat_template_pieces(
    messages: Sequence[Message], image_token: str, *, add_generation_prompt: bool, tokenizer
) -> list[Piece]:
    """Renders the history up to each assistant turn with and without that turn: the text in
    between is the turn (labelled), the text before it the prompt. Templates that rewrite
    earlier turns as the conversation grows (some drop old reasoning) cannot be split so."""
    messages = list(messages)

    def render(upto: int, generation: bool) -> str:
        if upto == 0:
            return ""
        return tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=generation
        )

    pieces: list[Piece] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head, full = render(i, True), render(i + 1, False)
        if not head.startswith(done) or not full.startswith(head):
            raise ConfigError(
                "the tokenizer's chat template renders earlier turns differently as the conversation "
                "grows, so its assistant turns cannot be found; set processor.conversation to "
                "'vicuna_v1' or 'plain'"
            )
        pieces += [(head[len(done) :], False), (full[len(head) :], True)]
        done = full
    rest = render(len(messages), add_generation_prompt)
    if not rest.startswith(done):
        raise ConfigError("the tokenizer's chat template is not incremental; set processor.conversation")
    if rest[len(done) :]:
        pieces.append((rest[len(done) :], False))
    return pieces


#: Conversation templates by name; ``processor.conversation`` picks one ("auto": the tokenizer's
#: chat template when it has one, else ``vicuna_v1``).
CONVERSATIONS = {"chat_template": chat_template_pieces, "plain": _plain, "vicuna_v1": _vicuna_v1}


def conversation_template(name: str, tokenizer):
    """The template function a processor uses for ``processor.conversation = name``."""
    if name == "auto":
        name = "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"
    if name == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("processor.conversation = 'chat_template', but the tokenizer has no chat template")
    return CONVERSATIONS[name]
