"""The text side of a sample: prompt templates, tokens, image placeholders and masked labels."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from vlm.config import ProcessorConfig
from vlm.conversation import EOS, Piece, chat_template_pieces, conversation_template, render_chat
from vlm.model import IGNORE_INDEX
from vlm.registry import TILINGS
from vlm.schema import ConfigError
from vlm.tiling.base import Size, Tiling

IMAGE_TOKEN = "<image>"
TOKEN_CACHE_SIZE = 1 << 16  # texts whose ids a processor remembers

#: Prompts per task; ``{images}`` becomes one ``<image>`` per image, ``{question}`` the question.
TEMPLATES = {
    "caption": "{images}Describe the image briefly.",
    "vqa": "{images}{question} Answer with a single word or phrase.",
}


class Processor:
    """Turns samples into ``input_ids`` and ``labels`` for a model: (task, question, answer)
    examples, conversations (:meth:`encode_messages`) and interleaved documents
    (:meth:`encode_document`).

    Args:
        tokenizer: a transformers tokenizer holding the ``<image>`` special token.
        tokens_per_image: placeholders per image, or per tile (``model.tokens_per_image``).
        tiling: how images are cut into tiles and how many placeholders each takes
            (``model.tiling``); needed when ``config.tiling`` cuts images into tiles. The
            methods then take ``image_sizes``, each image's ``(height, width)`` in reading order.
        config: the settings (``model.config.processor`` for a model's own); ``overrides``
            replace some of its fields (``max_length=...``, ``templates=...``, ``chat=...``).
            Longer samples than ``max_length`` are counted in ``truncated``; those that cannot
            be cut to fit are counted in ``dropped``, by reason.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        tokens_per_image: int,
        config: ProcessorConfig | None = None,
        image_token: str = IMAGE_TOKEN,
        tiling: Tiling | None = None,
        **overrides: Any,
    ):
        self.config = dataclasses.replace(config or ProcessorConfig(), **overrides)
        if tiling is None:
            if TILINGS.get(self.config.tiling).splits:
                raise ConfigError(
                    f"processor.tiling {self.config.tiling.name!r} needs the model's tiling: "
                    "Processor(..., tiling=model.tiling)"
                )
            tiling = TILINGS.build(self.config.tiling, tile_size=0, tokens_per_tile=tokens_per_image)
        self.tiling = tiling
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ConfigError(
                f"the tokenizer has no {image_token!r} token; add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}}) "
                "and set the model's image_token_id to its id"
            )
        self.tokens_per_image = tokens_per_image
        self.max_length = self.config.max_length
        self.templates = {**TEMPLATES, **self.config.templates}
        chat = self.config.chat
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.conversation = conversation_template(self.config.conversation, tokenizer)
        self.truncated = 0
        self.dropped: Counter = Counter()
        self._token_cache: dict[tuple[str, bool], tuple[int, ...]] = {}

    def task_text(self, task: str, *, question: str | None = None, num_images: int = 1) -> str:
        """The task's template filled in (before any chat template)."""
        if task not in self.templates:
            raise ValueError(f"unknown task {task!r}; templates exist for {sorted(self.templates)}")
        return self.templates[task].format(images=(self.image_token + "\n") * num_images, question=question)

    def prompt(self, task: str, *, question: str | None = None, num_images: int = 1) -> str:
        text = self.task_text(task, question=question, num_images=num_images)
        if self.chat:
            messages = [{"role": "user", "content": text}]
            text = render_chat(
                messages, self.image_token, add_generation_prompt=True, tokenizer=self.tokenizer
            )
        return text

    def _ids(self, text: str, *, special: bool) -> list[int]:
        # Templated pieces (prompts, roles, short answers) repeat across samples; a tokenizer
        # call costs ~0.1 ms, a quarter of the data loader's time on the shapes demo.
        key = (text, special)
        ids = self._token_cache.get(key)
        if ids is None:
            if len(self._token_cache) >= TOKEN_CACHE_SIZE:
                self._token_cache.clear()
            ids = self._token_cache[key] = tuple(
                self.tokenizer(text, add_special_tokens=special)["input_ids"]
            )
        return list(ids)

    def image_ids(self, size: Size | None) -> list[int]:
        """What one ``<image>`` marker becomes for an image of ``size`` (its placeholders, and
        the tiling's row and column markers)."""
        if size is None and self.tiling.splits:
            raise ValueError(
                f"processor.tiling {self.config.tiling.name!r} needs each image's size: pass image_sizes"
            )
        text = self.tiling.image_text(size, self.image_token)
        if text is None:
            return [self.image_token_id] * self.tiling.num_tokens(size)
        return self._ids(text, special=False)

    def _expand(self, ids: list[int], sizes: Iterator[Size | None], spans: list | None = None) -> list[int]:
        """Each ``<image>`` token becomes its image's :meth:`image_ids` (sizes taken in order);
        ``spans`` collects each image's ``(start, end)`` in the result."""
        out: list[int] = []
        for token in ids:
            if token != self.image_token_id:
                out.append(token)
                continue
            image = self.image_ids(next(sizes, None))
            if spans is not None:
                spans.append((len(out), len(out) + len(image)))
            out += image
        return out

    def _with_bos(self, ids: list[int]) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids

    def prompt_ids(
        self,
        task: str,
        *,
        question: str | None = None,
        num_images: int = 1,
        support: Sequence[tuple[str | None, str]] = (),
        image_sizes: Sequence[Size] | None = None,
    ) -> list[int]:
        """Token ids of the prompt with each ``<image>`` expanded to ``tokens_per_image`` placeholders.

        ``support``: few-shot examples ``(question, answer)`` placed before the query, each with
        one image (its images come first in reading order), as open_flamingo evaluates: each
        as it is trained on (prompt, answer, EOS), or as earlier chat turns with a chat template.
        """
        if self.chat and support:
            messages: list[dict[str, str]] = []
            for shot_question, answer in support:
                messages += [
                    {"role": "user", "content": self.task_text(task, question=shot_question)},
                    {"role": "assistant", "content": answer},
                ]
            messages.append(
                {"role": "user", "content": self.task_text(task, question=question, num_images=num_images)}
            )
            pieces = chat_template_pieces(
                messages, self.image_token, add_generation_prompt=True, tokenizer=self.tokenizer
            )
            return self._tokens(pieces, image_sizes=image_sizes)[0]
        ids = self._ids(self.prompt(task, question=question, num_images=num_images), special=not self.chat)
        if not self.chat:
            shots: list[int] = []
            for shot_question, answer in support:
                shots += self._ids(self.task_text(task, question=shot_question), special=False)
                shots += self._answer_ids(answer)
            bos = self.tokenizer.bos_token_id
            query = ids[1:] if ids and bos is not None and ids[0] == bos else ids
            ids = self._with_bos(shots + query)
        return self._expand(ids, iter(image_sizes or ()))

    def _tokens(
        self,
        pieces: Sequence[Piece],
        *,
        bos: bool = False,
        image_sizes: Sequence[Size] | None = None,
        spans: list | None = None,
    ) -> tuple[list[int], list[int]]:
        """Ids and labels of rendered pieces, each tokenized on its own (images expanded;
        ``spans`` collects where each image's tokens are)."""
        ids = self._with_bos([]) if bos else []
        labels = [IGNORE_INDEX] * len(ids)
        sizes = iter(image_sizes or ())
        for text, labelled in pieces:
            if text is EOS:
                piece = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
            else:
                own: list = []
                piece = self._expand(self._ids(text, special=False), sizes, own)
                if spans is not None:
                    spans += [(len(ids) + a, len(ids) + b) for a, b in own]
            ids += piece
            labels += [t if labelled and t != self.image_token_id else IGNORE_INDEX for t in piece]
        return ids, labels

    def _conversation(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        image_sizes: Sequence[Size] | None = None,
        spans: list | None = None,
    ):
        pieces = self.conversation(
            messages, self.image_token, add_generation_prompt=add_generation_prompt, tokenizer=self.tokenizer
        )
        bos = self.conversation is not chat_template_pieces
        return self._tokens(pieces, bos=bos, image_sizes=image_sizes, spans=spans)

    def encode_messages(
        self, messages: Sequence[dict[str, Any]], *, image_sizes: Sequence[Size] | None = None
    ) -> dict[str, Any] | None:
        """A conversation (``[{"role", "content"}]``, ``<image>`` where each image goes) as
        ``input_ids`` and ``labels`` on the assistant turns only, cut to ``max_length`` (see
        :meth:`fit`); ``num_images`` is how many of its images are left."""
        spans: list = []
        ids, labels = self._conversation(
            messages, add_generation_prompt=False, image_sizes=image_sizes, spans=spans
        )
        return self.fit(ids, labels, spans)

    def messages_prompt_ids(
        self, messages: Sequence[dict[str, Any]], *, image_sizes: Sequence[Size] | None = None
    ) -> list[int]:
        """The ids that make the model answer the conversation's last user turn."""
        return self._conversation(messages, add_generation_prompt=True, image_sizes=image_sizes)[0]

    def _document(
        self,
        document: str,
        *,
        prompt: bool,
        image_sizes: Sequence[Size] | None = None,
        spans: list | None = None,
    ) -> tuple[list[int], list[int]]:
        chunks = document.split(self.image_token)
        pieces: list[Piece] = []
        for k, chunk in enumerate(chunks):
            if k:
                pieces.append((self.image_token, False))
            if chunk.strip():
                pieces.append((chunk.strip(), True))
                if not (prompt and k == len(chunks) - 1):  # a prompt's last text goes on
                    pieces.append((EOS, True))
        return self._tokens(pieces, bos=True, image_sizes=image_sizes, spans=spans)

    def encode_document(
        self, document: str, *, image_sizes: Sequence[Size] | None = None
    ) -> dict[str, Any] | None:
        """An interleaved document (text with ``<image>`` markers) with the loss on its text:
        every text chunk ends with EOS, as Flamingo ends each chunk before the next image
        (``<|endofchunk|>``). Cut to ``max_length`` (see :meth:`fit`)."""
        spans: list = []
        ids, labels = self._document(document, prompt=False, image_sizes=image_sizes, spans=spans)
        return self.fit(ids, labels, spans)

    def document_prompt_ids(self, document: str, *, image_sizes: Sequence[Size] | None = None) -> list[int]:
        """The ids of a document to continue: a few-shot prompt such as ``"<image>red<image>"``."""
        return self._document(document, prompt=True, image_sizes=image_sizes)[0]

    def fit(
        self, ids: list[int], labels: list[int], spans: Sequence[tuple[int, int]] | None = None
    ) -> dict[str, Any] | None:
        """``ids`` cut to ``max_length``, never inside an image's tokens (``spans``: each image's
        ``(start, end)``; the cut moves to before that image, and ``num_images`` says how many
        images remain). ``None`` when no label is left (counted in ``dropped["no_label"]``)."""
        if spans is None:  # one run of tokens_per_image placeholders per image
            starts = [i for i, t in enumerate(ids) if t == self.image_token_id][:: self.tokens_per_image]
            spans = [(s, s + self.tokens_per_image) for s in starts]
        cut = len(ids)
        if cut > self.max_length:
            self.truncated += 1
            cut = self.max_length
            cut = next((start for start, end in spans if start < cut < end), cut)
        if all(label == IGNORE_INDEX for label in labels[1:cut]):  # position 0 is never predicted
            self.dropped["no_label"] += 1
            return None
        kept = sum(end <= cut for _, end in spans)
        return {"input_ids": ids[:cut], "labels": labels[:cut], "num_images": kept}

    def _parts(
        self,
        task: str,
        *,
        question: str | None,
        answer: str | None,
        num_images: int,
        image_sizes: Sequence[Size] | None = None,
    ) -> tuple[list[int], list[int]]:
        """The prompt's ids and the answer's (with EOS), untruncated."""
        prompt = self.prompt_ids(task, question=question, num_images=num_images, image_sizes=image_sizes)
        return prompt, [] if answer is None else self._answer_ids(answer)

    def _answer_ids(self, answer: str) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return self._ids(answer, special=False) + ([] if eos is None else [eos])

    def encode(
        self,
        task: str,
        *,
        question: str | None = None,
        answer: str | None = None,
        num_images: int = 1,
        image_sizes: Sequence[Size] | None = None,
    ) -> dict[str, list[int]] | None:
        """``input_ids`` and ``labels`` (prompt masked with -100); ``None`` when even the prompt
        does not fit in ``max_length`` (counted in ``truncated``)."""
        prompt, answer_ids = self._parts(
            task, question=question, answer=answer, num_images=num_images, image_sizes=image_sizes
        )
        ids = prompt + answer_ids
        if len(ids) > self.max_length:
            self.truncated += 1
            if len(prompt) >= self.max_length:
                return None
            ids = ids[: self.max_length]
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
        return {"input_ids": ids, "labels": labels}

    def encode_turns(
        self, turns: list[dict[str, Any]], *, num_images: int = 1, image_sizes: Sequence[Size] | None = None
    ) -> dict[str, list[int]] | None:
        """Several (task, question, answer) turns about the same images in one sequence that
        shares the image prefix: ``prefix + turn_1 + turn_2 + ...``.

        ``segment_ids`` (0 on the prefix, ``k`` on turn ``k``) let the model attend from each turn
        to the prefix and to itself only, with positions that continue from the prefix; each turn
        is then computed as if it were encoded alone (:meth:`encode`), but the images are
        processed once. (Plain concatenation would let a question read earlier answers, e.g. the
        caption, instead of the image.)

        A turn with no prompt text after the images (a ``"{images}"`` template) predicts its
        first answer token from the last image placeholder, which only the turn right after the
        prefix can do: one such turn is put first, and any other loses that one label. Turns
        that do not fit in ``max_length`` are dropped, each counted in ``truncated``; ``None``
        when not even the first fits.
        """
        parts = [
            self._parts(
                t["task"],
                question=t.get("question"),
                answer=t["answer"],
                num_images=num_images,
                image_sizes=image_sizes,
            )
            for t in turns
        ]
        first_prompt = parts[0][0]
        images = [i for i, token in enumerate(first_prompt) if token == self.image_token_id]
        prefix = images[-1] + 1 if images else 0  # everything up to the last image placeholder
        if any(prompt[:prefix] != first_prompt[:prefix] for prompt, _ in parts):
            raise ConfigError(
                "packing turns needs templates that start with the images ('{images}...') so that "
                "every turn shares them; set data.pack_turns = false"
            )
        order = sorted(range(len(turns)), key=lambda i: len(parts[i][0]) > prefix)  # stable
        head = turns[order[0]]
        first = self.encode(
            head["task"],
            question=head.get("question"),
            answer=head["answer"],
            num_images=num_images,
            image_sizes=image_sizes,
        )
        if first is None:
            return None
        ids, labels = list(first["input_ids"]), list(first["labels"])
        segments = [0] * prefix + [1] * (len(ids) - prefix)
        for k, i in enumerate(order[1:], start=2):
            prompt, answer = parts[i]
            suffix = prompt[prefix:] + answer
            if len(ids) + len(suffix) > self.max_length:
                self.truncated += 1
                continue
            suffix_labels = [IGNORE_INDEX] * (len(prompt) - prefix) + answer
            if len(prompt) == prefix:  # its first token would be predicted from the turn before
                suffix_labels[0] = IGNORE_INDEX
            ids += suffix
            labels += suffix_labels
            segments += [k] * len(suffix)
        return {"input_ids": ids, "labels": labels, "segment_ids": segments}

    def pack(self, encoded: list[dict[str, list[int]]]) -> dict[str, list[int]]:
        """Several encoded samples (from :meth:`encode` or :meth:`encode_turns`) in one row.

        ``sample_ids`` (0, 1, ... per sample) make the model attend within each sample only, at
        positions that restart with it: every sample computes what it computes alone, and the
        row has no padding to pay for. A sample's images stay in reading order, so the row's
        images are its samples' images one after another.
        """
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "sample_ids": []}
        turns = any("segment_ids" in e for e in encoded)
        if turns:
            row["segment_ids"] = []
        for k, e in enumerate(encoded):
            n = len(e["input_ids"])
            row["input_ids"] += e["input_ids"]
            # The first token of a sample is never predicted from the sample before it.
            row["labels"] += ([IGNORE_INDEX] + e["labels"][1:]) if k else e["labels"]
            row["sample_ids"] += [k] * n
            if turns:
                row["segment_ids"] += e.get("segment_ids", [1] * n)
        return row

    def pad(self, encoded: list[dict[str, list[int]]], *, side: str = "right") -> dict[str, torch.Tensor]:
        """Pads to the longest: ``side="right"`` for training, ``"left"`` for generation."""
        if side not in ("left", "right"):
            raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
        length = max(len(e["input_ids"]) for e in encoded)
        batch = {
            "input_ids": torch.full((len(encoded), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(len(encoded), length, dtype=torch.long),
        }
        if all("labels" in e for e in encoded):
            batch["labels"] = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
        if any("segment_ids" in e for e in encoded):  # a row without turns is one segment after its prefix
            batch["segment_ids"] = torch.zeros(len(encoded), length, dtype=torch.long)
        if any("sample_ids" in e for e in encoded):  # a row without them is one sample
            batch["sample_ids"] = torch.zeros(len(encoded), length, dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e["input_ids"])
            cols = slice(length - n, length) if side == "left" else slice(0, n)
            batch["input_ids"][row, cols] = torch.tensor(e["input_ids"])
            batch["attention_mask"][row, cols] = 1
            if "labels" in batch:
                batch["labels"][row, cols] = torch.tensor(e["labels"])
            if "segment_ids" in batch:
                batch["segment_ids"][row, cols] = torch.tensor(e.get("segment_ids", [1] * n))
            if "sample_ids" in batch:
                batch["sample_ids"][row, cols] = torch.tensor(e.get("sample_ids", [0] * n))
        return batch
