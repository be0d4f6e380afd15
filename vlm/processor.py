"""The text side of a sample: prompt templates, tokens, image placeholders and masked labels."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vlm.config import ProcessorConfig
from vlm.model import IGNORE_INDEX
from vlm.schema import ConfigError

IMAGE_TOKEN = "<image>"

#: Prompts per task; ``{images}`` becomes one ``<image>`` per image, ``{question}`` the question.
TEMPLATES = {
    "caption": "{images}Describe the image briefly.",
    "vqa": "{images}{question} Answer with a single word or phrase.",
}


class Processor:
    """Turns (task, question, answer) into ``input_ids`` and ``labels`` for a model.

    Args:
        tokenizer: a transformers tokenizer holding the ``<image>`` special token.
        tokens_per_image: placeholders per image (``model.tokens_per_image``).
        config: the settings (``model.config.processor`` for a model's own); ``overrides``
            replace some of its fields (``max_length=...``, ``templates=...``, ``chat=...``).
            Longer samples than ``max_length`` are counted in ``truncated``.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        tokens_per_image: int,
        config: ProcessorConfig | None = None,
        image_token: str = IMAGE_TOKEN,
        **overrides: Any,
    ):
        self.config = dataclasses.replace(config or ProcessorConfig(), **overrides)
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
        self.truncated = 0

    def prompt(self, task: str, *, question: str | None = None, num_images: int = 1) -> str:
        if task not in self.templates:
            raise ValueError(f"unknown task {task!r}; templates exist for {sorted(self.templates)}")
        text = self.templates[task].format(images=(self.image_token + "\n") * num_images, question=question)
        if self.chat:
            messages = [{"role": "user", "content": text}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text

    def _ids(self, text: str, *, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def prompt_ids(self, task: str, *, question: str | None = None, num_images: int = 1) -> list[int]:
        """Token ids of the prompt with each ``<image>`` expanded to ``tokens_per_image`` placeholders."""
        ids = self._ids(self.prompt(task, question=question, num_images=num_images), special=not self.chat)
        bos = self.tokenizer.bos_token_id
        if bos is not None and not self.chat and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        out: list[int] = []
        for token in ids:
            out += [token] * self.tokens_per_image if token == self.image_token_id else [token]
        return out

    def _parts(
        self, task: str, *, question: str | None, answer: str | None, num_images: int
    ) -> tuple[list[int], list[int]]:
        """The prompt's ids and the answer's (with EOS), untruncated."""
        prompt = self.prompt_ids(task, question=question, num_images=num_images)
        answer_ids = []
        if answer is not None:
            answer_ids = self._ids(answer, special=False)
            if self.tokenizer.eos_token_id is not None:
                answer_ids.append(self.tokenizer.eos_token_id)
        return prompt, answer_ids

    def encode(
        self, task: str, *, question: str | None = None, answer: str | None = None, num_images: int = 1
    ) -> dict[str, list[int]] | None:
        """``input_ids`` and ``labels`` (prompt masked with -100); ``None`` when even the prompt
        does not fit in ``max_length`` (counted in ``truncated``)."""
        prompt, answer_ids = self._parts(task, question=question, answer=answer, num_images=num_images)
        ids = prompt + answer_ids
        if len(ids) > self.max_length:
            self.truncated += 1
            if len(prompt) >= self.max_length:
                return None
            ids = ids[: self.max_length]
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
        return {"input_ids": ids, "labels": labels}

    def encode_turns(
        self, turns: list[dict[str, Any]], *, num_images: int = 1
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
            self._parts(t["task"], question=t.get("question"), answer=t["answer"], num_images=num_images)
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
            head["task"], question=head.get("question"), answer=head["answer"], num_images=num_images
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
