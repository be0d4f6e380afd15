"""Conversations as text: the pieces a multi-turn chat renders to, and which of them are learned.

A template turns role/content messages (the form transformers' chat templates take) into
``(text, labelled)`` pieces; the processor tokenizes each piece on its own, so training and
generation see the very same tokens for the same history. ``EOS`` stands for the tokenizer's
end-of-sequence token, whatever its spelling.

- ``chat_template``: the tokenizer's own Jinja template, rendered once per assistant turn to
  find where each turn starts and ends (:func:`render_chat`: a template that reads each
  message's content as a list of parts, as transformers' processor templates do, gets one);
- ``plain``: LLaVA's stage 1: each user turn is only its images, each assistant turn its text
  and ``EOS`` (a caption right after the image);
- ``vicuna_v1``: LLaVA-1.5's stage 2: ``SYSTEM USER: ... ASSISTANT: ...</s>USER: ...``.

``plain`` and ``vicuna_v1`` are also written as Jinja beside their renderers (:data:`JINJA`):
the bodies of the chat template an export carries (:mod:`vlm.convert.chat_template`). Change
one, change both (tests/test_export_chat_template.py compares them).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
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


# ``vlm_text(content)`` is a content as vlm's string; :mod:`vlm.convert.chat_template` defines
# it with ``vlm_image``, ``vlm_bos`` and ``vlm_eos``. BOS is written here; the export's wrapper
# drops it where transformers' tokenizer adds it.
PLAIN_JINJA = """
{%- if vlm_bos -%}{{ vlm_bos }}{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'user' -%}
{{- vlm_image * vlm_text(message['content']).count(vlm_image) -}}
{%- elif message['role'] == 'assistant' -%}
{{- (vlm_text(message['content']) | trim) + vlm_eos -}}
{%- endif -%}
{%- endfor -%}
"""


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


VICUNA_JINJA = (
    """
{%- if vlm_bos -%}{{ vlm_bos }}{%- endif -%}
{%- set vlm_system = messages | selectattr('role', 'equalto', 'system') | list -%}
{%- if vlm_system -%}{{ vlm_text(vlm_system[0]['content']) + ' ' }}
{%- else -%}{{ """
    + json.dumps(VICUNA_SYSTEM + " ")
    + """ }}
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'user' -%}
{{- 'USER: ' + vlm_text(message['content']) + ' ' -}}
{%- elif message['role'] == 'assistant' -%}
{{- 'ASSISTANT:' + (vlm_text(message['content']) | trim) + vlm_eos -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}
"""
)


@dataclass(frozen=True)
class TemplateStyle:
    """How a tokenizer's chat template reads messages (:func:`template_style`).

    Attributes:
        parts: it reads each content as a list of parts (``{"type": "image"}``, ``{"type":
            "text", "text": ...}``), as transformers' processor templates do (llava-hf's), and
            renders the image marker itself; otherwise it reads strings.
        prefix: what each render starts with: for a parts template, the tokenizer's BOS when the
            tokenizer adds one to a text (Llama's, llava-hf's) and the template does not write it,
            since transformers' processors tokenize such renders with the special tokens; ``""``
            for a template over strings (vlm tokenizes those as transformers' tokenizers do, with
            none). A template that reads both alike, an image part as vlm's string gives it
            (``"<image>\\n"``), is a processor's template, read over parts: an export's
            (:mod:`vlm.convert.chat_template`) comes back into vlm with the prompts it left with.
    """

    parts: bool
    prefix: str = ""


_PROBE = "vlm probe text"  # a user message's text, looked for in a probe render
_STYLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (template, token, style)


def _probe(tokenizer, content: str | list[dict[str, str]]) -> str:
    try:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # noqa: BLE001 - a template may raise anything on content it does not read
        return ""


def _find_style(tokenizer, image_token: str) -> TemplateStyle:
    imaged = _probe(tokenizer, [{"type": "image"}, {"type": "text", "text": _PROBE}])
    if imaged.count(image_token) == 1 and imaged == _probe(tokenizer, f"{image_token}\n{_PROBE}"):
        # It reads both alike, an image part as vlm's string gives it: a processor's template
        # (an export's), read over parts, with the processor's BOS.
        return TemplateStyle(parts=True, prefix=tokenizer.bos_token if adds_bos(tokenizer) else "")
    if _PROBE in _probe(tokenizer, _PROBE):
        return TemplateStyle(parts=False)  # strings, as vlm's own data holds them
    if _PROBE not in _probe(tokenizer, [{"type": "text", "text": _PROBE}]):
        return TemplateStyle(parts=False)  # neither: rendered as before, the template's errors its own
    if imaged.count(image_token) != 1:
        raise ConfigError(
            f"the tokenizer's chat template renders an image part as {imaged!r}, not with the "
            f"{image_token!r} token the model's image placeholders expand from; give the tokenizer a "
            "template that renders it, or set processor.chat = false and processor.conversation = "
            "'vicuna_v1'"
        )
    return TemplateStyle(parts=True, prefix=tokenizer.bos_token if adds_bos(tokenizer) else "")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS in front of a text it tokenizes with special tokens
    (Llama's does, GPT-2's does not): what transformers' processors do with a rendered chat."""
    bos = tokenizer.bos_token
    return bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [
        tokenizer.bos_token_id
    ]


def template_style(tokenizer, image_token: str) -> TemplateStyle:
    """Whether the tokenizer's chat template reads string contents or lists of parts, found by
    rendering a probe message both ways (strings first: a template that reads both keeps
    vlm's strings), once per tokenizer and template."""
    template = tokenizer.chat_template
    cached = _STYLES.get(tokenizer)
    if cached is None or cached[0] is not template or cached[1] != image_token:
        cached = _STYLES[tokenizer] = (template, image_token, _find_style(tokenizer, image_token))
    return cached[2]


def content_parts(content: str, image_token: str) -> list[dict[str, str]]:
    """A string content as a list of parts: each ``image_token`` an image part where it stands
    (with the newline after it, which the template writes itself), the text between as text parts."""
    parts: list[dict[str, str]] = []
    for k, chunk in enumerate(content.split(image_token)):
        if k:
            parts.append({"type": "image"})
            chunk = chunk.removeprefix("\n")
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def render_chat(
    messages: Sequence[Message], image_token: str, *, add_generation_prompt: bool, tokenizer
) -> str:
    """The tokenizer's chat template over vlm's messages (string contents, ``image_token`` where
    each image goes). A template that reads lists of parts gets each content as
    :func:`content_parts`, and the render begins as transformers' processor tokenizes it
    (:class:`TemplateStyle`); a template that reads strings gets them as they are."""
    style = template_style(tokenizer, image_token)
    if style.parts:
        messages = [
            {**m, "content": content_parts(m["content"], image_token)} if isinstance(m["content"], str) else m
            for m in messages
        ]
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return text if text.startswith(style.prefix) else style.prefix + text


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
        return render_chat(
            messages[:upto], image_token, add_generation_prompt=generation, tokenizer=tokenizer
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
#: The named templates as Jinja bodies (``chat_template`` is the tokenizer's own, wrapped).
JINJA = {"plain": PLAIN_JINJA, "vicuna_v1": VICUNA_JINJA}


def conversation_name(name: str, tokenizer) -> str:
    """The template ``processor.conversation = name`` means for this tokenizer ("auto" resolved)."""
    if name == "auto":
        name = "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"
    if name == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("processor.conversation = 'chat_template', but the tokenizer has no chat template")
    return name


def conversation_template(name: str, tokenizer):
    """The template function a processor uses for ``processor.conversation = name``."""
    return CONVERSATIONS[conversation_name(name, tokenizer)]
