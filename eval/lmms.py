"""vlm models in lmms-eval: ``lmms-eval --model vlm --model_args pretrained=DIR --tasks ...``.

Installed with the ``lmms`` extra (``pip install -e '.[lmms]'``), which registers :func:`manifest`
in lmms-eval's ``lmms_eval.models`` entry-point group. The model is a chat model in lmms-eval's
terms: each request arrives as messages with their images (a task's ``doc_to_visual`` and
``doc_to_text``, or its ``doc_to_messages``), and goes to :meth:`Predictor.chat_batch` as one
conversation. Requests with the same generation settings are generated together,
``batch_size`` at a time; ``max_new_tokens`` and the sampling settings come from the task's
``generation_kwargs``, and each reply ends before the first of its ``until`` strings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.protocol import ChatMessages
from tqdm import tqdm

from vlm.eval.predict import Predictor, batched
from vlm.generate import GenerationConfig

log = logging.getLogger(__name__)

MODEL_ARGS = ("pretrained", "device", "batch_size", "system_prompt")

# lmms-eval's generation_kwargs that map onto GenerationConfig's fields; ``until`` is applied
# to the text. Others (a task's hints for one model family) are ignored, and named once.
_GENERATION_KEYS = {"max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams"}


def manifest() -> ModelManifest:
    """What lmms-eval reads from the ``lmms_eval.models`` entry point: ``--model vlm``."""
    return ModelManifest(model_id="vlm", chat_class_path=f"{__name__}.{VLMEval.__name__}")


class VLMEval(lmms):
    """A saved vlm model answering lmms-eval's requests through :class:`Predictor`.

    Args:
        pretrained: a directory written by ``save_pretrained`` (with its tokenizer), as
            ``--model_args pretrained=DIR``.
        device: ``auto``, ``cpu``, ``cuda``... (lmms-eval's ``--device``; default ``auto``).
        batch_size: conversations generated together (lmms-eval's ``--batch_size``).
        system_prompt: a system message put before every conversation: the text, or a file
            holding it.
        max_batch_size: lmms-eval passes it for automatic batch sizes; vlm takes a fixed one.
    """

    is_simple = False  # requests come as chat messages

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        system_prompt: str = "",
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"vlm takes no model_args {sorted(unknown)}; it takes {', '.join(MODEL_ARGS)}")
        if not pretrained:
            raise ValueError("give the model directory: --model_args pretrained=DIR")
        self.batch_size = _batch_size(batch_size)
        self.predictor = Predictor(pretrained, device=device or "auto")
        self.device = self.predictor.device
        self.system_prompt = self._resolve_system_prompt(system_prompt)
        self._defaults = self.predictor.generation
        self._ignored: set[str] = set()

    def generate_until(self, requests: Sequence[Instance]) -> list[str]:
        """Each request's reply: its messages through :meth:`Predictor.chat_batch`, cut before
        the first of its ``until`` strings."""
        groups: dict[str, list[int]] = {}  # requests with the same generation_kwargs
        for i, request in enumerate(requests):
            key = json.dumps(request.args[2] or {}, sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        replies = [""] * len(requests)
        progress = tqdm(total=len(requests), desc="vlm", disable=self.rank != 0)
        try:
            for indices in groups.values():
                gen_kwargs = requests[indices[0]].args[2] or {}
                self.predictor.generation, until = self._settings(gen_kwargs)
                for batch in batched(indices, self.batch_size):
                    conversations = [self._messages(requests[i]) for i in batch]
                    for i, reply in zip(batch, self.predictor.chat_batch(conversations)):
                        replies[i] = cut_at(reply, until)
                        context = requests[i].args[0]
                        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), replies[i])
                    progress.update(len(batch))
        finally:
            self.predictor.generation = self._defaults
            progress.close()
        return replies

    def loglikelihood(self, requests: Sequence[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "vlm runs in lmms-eval as a chat model, and lmms-eval gives chat models generation "
            "tasks only (output_type: generate_until); it has no loglikelihood tasks for them"
        )

    def generate_until_multi_round(self, requests: Sequence[Instance]) -> list[str]:
        raise NotImplementedError(
            "vlm's lmms-eval adapter answers single-round tasks (output_type: generate_until); "
            "multi-round tasks are not supported yet"
        )

    def _messages(self, request: Instance) -> list[dict[str, Any]]:
        """The request's conversation in transformers' format, which ``Predictor.chat`` takes."""
        _, doc_to_messages, _, doc_id, task, split = request.args
        chat = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
        for message in chat.messages:
            for part in message.content:
                if part.type not in ("text", "image"):
                    raise ValueError(
                        f"task {task}, doc {doc_id}: vlm models read text and images, not {part.type}"
                    )
        return self._apply_system_prompt(chat.to_hf_messages(), self.system_prompt)

    def _settings(self, gen_kwargs: dict[str, Any]) -> tuple[GenerationConfig, tuple[str, ...]]:
        """lmms-eval's generation_kwargs as vlm's decoding settings, and the stop strings."""
        ignored = set(gen_kwargs) - _GENERATION_KEYS - {"until"} - self._ignored
        if ignored:
            log.warning("vlm ignores these generation_kwargs: %s", ", ".join(sorted(ignored)))
            self._ignored |= ignored
        temperature = float(gen_kwargs.get("temperature") or 0)
        sample = bool(gen_kwargs.get("do_sample", temperature > 0))
        settings = dataclasses.replace(
            self._defaults,
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self._defaults.max_new_tokens),
            do_sample=sample,
            temperature=temperature if sample and temperature > 0 else self._defaults.temperature,
            top_p=float(gen_kwargs.get("top_p") or self._defaults.top_p),
            top_k=int(gen_kwargs.get("top_k") or self._defaults.top_k),
            num_beams=int(gen_kwargs.get("num_beams") or 1),
        )
        until = gen_kwargs.get("until") or ()
        return settings, (until,) if isinstance(until, str) else tuple(until)


def cut_at(reply: str, until: Sequence[str]) -> str:
    """``reply`` up to the first of the ``until`` strings (and without trailing space)."""
    ends = [reply.find(stop) for stop in until if stop and stop in reply]
    return reply[: min(ends)].rstrip() if ends else reply


def _batch_size(value: int | str) -> int:
    if (isinstance(value, int) or str(value).isdigit()) and int(value) >= 1:
        return int(value)
    raise ValueError(f"--batch_size {value!r}: vlm takes a number of conversations (1 or more), not 'auto'")
