"""The chat template an export carries: vlm's conversation rendering as Jinja, for transformers.

transformers' processors render a conversation with a Jinja template, then tokenize the text
with the tokenizer's special tokens (``processor.apply_chat_template(messages)`` then
``processor(images=..., text=...)``). :func:`chat_template` writes the template that makes this
give the ids vlm's :class:`~vlm.processor.Processor` gives for the same conversation
(``Predictor.chat``'s prompt), whichever ``processor.conversation`` the model was trained with:

- a content is read as vlm reads it (``vlm_text``): a string as it is; a list of parts as
  their texts, each image part the image marker and a newline where it stands;
- the body is the named template's Jinja (:data:`vlm.conversation.JINJA`), or the tokenizer's
  own template given the contents it gets in vlm: strings, or for a template over parts
  (:class:`~vlm.conversation.TemplateStyle`) vlm's strings cut back into parts;
- the render keeps a leading BOS only where the tokenizer does not add one itself, so the
  processor's tokenization has exactly one wherever vlm's prompt has one.

vlm tokenizes each turn on its own; transformers tokenizes the whole text. The two agree where
the tokenizer never merges text across a turn's edge (word-level tokenizers, byte-level BPE at
most edges); :func:`prompt_mismatch` checks a probe conversation both ways, and the export warns
when they disagree.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from vlm.config import ProcessorConfig
from vlm.conversation import JINJA, adds_bos, conversation_name, template_style
from vlm.processor import Processor

log = logging.getLogger(__name__)

#: After ``vlm_image`` (the marker) and ``vlm_adds_bos`` (:func:`chat_template` sets them):
#: ``vlm_bos`` / ``vlm_eos`` (the tokenizer's, or empty) and ``vlm_text(content)``, a content as
#: vlm's string (as ``vlm.eval.predict.conversation_inputs`` makes it).
HEADER = """
{%- set vlm_bos = bos_token if bos_token is defined and bos_token else '' -%}
{%- set vlm_eos = eos_token if eos_token is defined and eos_token else '' -%}
{%- macro vlm_text(content) -%}
{%- if content is string -%}{{ content }}
{%- else -%}
{%- for part in content -%}
{%- if part['type'] == 'image' -%}{{ vlm_image + '\\n' }}
{%- elif part['type'] == 'text' -%}{{ part['text'] }}
{%- else -%}{{ raise_exception('a part is text or image, not ' + part['type'] | string) }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
"""

#: Contents as the strings vlm gives a tokenizer template over strings.
AS_STRINGS = """
{%- set vlm = namespace(messages=[]) -%}
{%- for message in messages -%}
{%- if message['content'] is none -%}{%- set vlm.messages = vlm.messages + [message] -%}
{%- else -%}{%- set vlm.messages = vlm.messages + [dict(message, content=vlm_text(message['content']))] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = vlm.messages %}
"""

#: Contents as the parts vlm gives a template over parts (``vlm.conversation.content_parts`` of
#: vlm's string: the newline after each marker is the template's to write).
AS_PARTS = """
{%- set vlm = namespace(messages=[], parts=[]) -%}
{%- for message in messages -%}
{%- if message['content'] is none -%}{%- set vlm.messages = vlm.messages + [message] -%}
{%- else -%}
{%- set vlm.parts = [] -%}
{%- for chunk in vlm_text(message['content']).split(vlm_image) -%}
{%- set text = chunk -%}
{%- if not loop.first -%}
{%- set vlm.parts = vlm.parts + [{'type': 'image'}] -%}
{%- set text = chunk[1:] if chunk.startswith('\\n') else chunk -%}
{%- endif -%}
{%- if text -%}{%- set vlm.parts = vlm.parts + [{'type': 'text', 'text': text}] -%}{%- endif -%}
{%- endfor -%}
{%- set vlm.messages = vlm.messages + [dict(message, content=vlm.parts)] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = vlm.messages %}
"""

#: The body's render, less a leading BOS the tokenizer adds again.
FOOTER = """
{%- if vlm_adds_bos and vlm_bos and vlm_rendered.startswith(vlm_bos) -%}
{{- vlm_rendered[vlm_bos | length:] -}}
{%- else -%}{{- vlm_rendered -}}
{%- endif -%}
"""


def chat_template(config: ProcessorConfig, tokenizer: Any, image_token: str) -> str:
    """The Jinja chat template rendering conversations as a model trained with ``config`` (its
    ``conversation``) and ``tokenizer`` sees them, ``image_token`` where each image goes."""
    name = conversation_name(config.conversation, tokenizer)
    if name == "chat_template":
        style = template_style(tokenizer, image_token)
        # The template starts on a line of its own (trim_blocks drops the newline before it)
        # and ends as it would alone: less one trailing newline (Jinja's default).
        body = (AS_PARTS if style.parts else AS_STRINGS).strip() + "\n"
        body += tokenizer.chat_template.removesuffix("\n")
    else:
        body = JINJA[name].strip()
    header = (
        f"{{%- set vlm_image = {json.dumps(image_token)} -%}}\n"
        f"{{%- set vlm_adds_bos = {'true' if adds_bos(tokenizer) else 'false'} -%}}\n" + HEADER.strip()
    )
    # ``{{ '' }}``: a line of spaces that ends the body is kept (lstrip_blocks would drop it
    # before ``{% endset %}``), as it would be alone.
    return f"{header}\n{{%- set vlm_rendered %}}\n{body}{{{{ '' }}}}{{% endset -%}}\n{FOOTER.strip()}"


#: A conversation the export checks both ways: (role, vlm's string, transformers' parts). The
#: system message is left out for a tokenizer's own template (many refuse one).
PROBE = [
    ("system", "You answer briefly.", [{"type": "text", "text": "You answer briefly."}]),
    ("user", "{image}\nWhat is it?", [{"type": "image"}, {"type": "text", "text": "What is it?"}]),
    ("assistant", "A probe.", [{"type": "text", "text": "A probe."}]),
    (
        "user",
        "And {image}\nthis?",
        [{"type": "text", "text": "And "}, {"type": "image"}, {"type": "text", "text": "this?"}],
    ),
]


def prompt_mismatch(template: str, config: ProcessorConfig, tokenizer: Any, image_token: str) -> str | None:
    """Why transformers' processor would tokenize ``template``'s render of a probe conversation
    otherwise than vlm's processor, or ``None`` when both give the same ids."""
    probe = PROBE[conversation_name(config.conversation, tokenizer) == "chat_template" :]
    ours = Processor(tokenizer, tokens_per_image=1, config=config, image_token=image_token)
    try:
        expected = ours.messages_prompt_ids(
            [{"role": role, "content": text.format(image=image_token)} for role, text, _ in probe]
        )
        text = tokenizer.apply_chat_template(
            [{"role": role, "content": parts} for role, _, parts in probe],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception as err:  # noqa: BLE001 - a tokenizer's template may refuse the probe any way
        return f"the probe conversation did not render ({err})"
    got = tokenizer(text, add_special_tokens=True)["input_ids"]
    if got == expected:
        return None
    if got[1:] == expected and adds_bos(tokenizer):
        return (
            "the tokenizer adds a BOS that vlm's prompts (its chat template's renders) lack; "
            "tokenize the render with add_special_tokens=False"
        )
    if tokenizer.decode(got) != tokenizer.decode(expected):
        return f"the texts differ: {tokenizer.decode(expected)!r} (vlm) against {tokenizer.decode(got)!r}"
    at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return (
        "the same text, tokenized otherwise: vlm tokenizes each turn on its own, and this tokenizer "
        f"merges text across a turn's edge ({tokenizer.convert_ids_to_tokens(expected[at : at + 3])} "
        f"in vlm's prompt against {tokenizer.convert_ids_to_tokens(got[at : at + 3])})"
    )


def export_chat_template(config: ProcessorConfig, tokenizer: Any, image_token: str) -> str:
    """:func:`chat_template`, with a warning when the probe conversation's ids differ."""
    template = chat_template(config, tokenizer, image_token)
    why = prompt_mismatch(template, config, tokenizer, image_token)
    if why is not None:
        log.warning("the exported chat template does not give vlm's prompt ids: %s", why)
    return template
