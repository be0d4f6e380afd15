"""``ModelConfig``: the whole model as nested dataclasses, one per part, serialised to JSON next
to the weights.

Each part (encoder, bridge, decoder) has its own dataclass; its ``name`` picks the registry
entry that builds it (see ``vlm.registry``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import vlm.bridges  # noqa: F401  (fills the registries that parse the parts)
import vlm.decoders  # noqa: F401
import vlm.encoders  # noqa: F401
import vlm.tiling  # noqa: F401
from vlm.conversation import CONVERSATIONS
from vlm.registry import BRIDGES, DECODERS, ENCODERS, TILINGS
from vlm.schema import ConfigError, parse_dataclass, to_dict

#: How an image becomes the encoder's square input (see ``vlm.data.transforms``).
RESIZE_MODES = ("crop", "pad")


@dataclass
class ProcessorConfig:
    """How text and images become the model's inputs: saved with the model, so inference
    prepares its inputs exactly as training did.

    Args:
        max_length: longer samples are cut at the end of the answer (and counted).
        resize: ``"crop"`` resizes the short side and centre-crops (CLIP, transformers' LLaVA);
            ``"pad"`` pads to a square with the mean colour first (LLaVA-1.5's training).
        templates: prompt templates per task, over ``vlm.processor.TEMPLATES``; ``{images}``
            becomes one ``<image>`` per image, ``{question}`` the question.
        chat: wrap the task prompts (caption, VQA) in the tokenizer's chat template; ``None``:
            when it has one.
        conversation: how conversations are rendered (``vlm.conversation``): ``"auto"`` (the
            tokenizer's chat template when it has one, else ``"vicuna_v1"``),
            ``"chat_template"``, ``"plain"`` (LLaVA's stage 1) or ``"vicuna_v1"`` (its stage 2).
        tiling: how an image becomes the encoder's tiles (``vlm.tiling``): ``{"name": "none"}``
            (one square view), ``"anyres"`` (LLaVA-NeXT / OneVision grids) or ``"split"``
            (Idefics3 / SmolVLM).
    """

    max_length: int = 512
    resize: str = "crop"
    templates: dict[str, str] = field(default_factory=dict)
    chat: bool | None = None
    conversation: str = "auto"
    tiling: Any = field(default_factory=lambda: TILINGS.parse({"name": "none"}))

    def __post_init__(self) -> None:
        self.tiling = TILINGS.parse(self.tiling)
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"processor.resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.max_length < 1:
            raise ConfigError(f"processor.max_length must be >= 1, got {self.max_length}")
        if self.conversation != "auto" and self.conversation not in CONVERSATIONS:
            raise ConfigError(
                f"processor.conversation must be 'auto' or one of {sorted(CONVERSATIONS)}, "
                f"got {self.conversation!r}"
            )


@dataclass
class ModelConfig:
    """A whole vision-language model: which encoder, bridge and decoder, and how they meet.

    Args:
        encoder: an encoder config (``name`` selects it, e.g. ``ViTConfig``, ``CLIPConfig``).
        bridge: a bridge config (``ProjectorConfig``, ``QFormerConfig``, ``PerceiverConfig``).
        decoder: a decoder config (``HFDecoderConfig``).
        image_token_id: id of the ``<image>`` placeholder in the LM vocabulary; ``None``
            appends one new token to the LM's embeddings and uses it.
        processor: how prompts and images are prepared for this model (:class:`ProcessorConfig`).
    """

    encoder: Any
    bridge: Any
    decoder: Any
    image_token_id: int | None = None
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept with the model

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        missing = [k for k in ("encoder", "bridge", "decoder") if k not in data]
        if missing:
            raise ConfigError(f"model config lacks {', '.join(missing)}; each needs a 'name'")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"model config: unknown key(s) {', '.join(map(repr, unknown))}")
        return cls(
            encoder=ENCODERS.parse(data["encoder"]),
            bridge=BRIDGES.parse(data["bridge"]),
            decoder=DECODERS.parse(data["decoder"]),
            image_token_id=data.get("image_token_id"),
            processor=_processor(data),
            extra={k: v for k, v in data.get("extra", {}).items() if k != "processor"},
        )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _processor(data: dict[str, Any]) -> ProcessorConfig:
    """The processor config of a model config dict. Models saved before it had its own table
    kept the settings in ``extra["processor"]`` (training's values, with no ``chat``)."""
    settings = data.get("processor")
    if settings is None:
        settings = data.get("extra", {}).get("processor", {})
    if isinstance(settings, ProcessorConfig):
        return settings
    return parse_dataclass(ProcessorConfig, dict(settings), where="model.processor")
