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
from vlm.registry import BRIDGES, DECODERS, ENCODERS
from vlm.schema import ConfigError, to_dict


@dataclass
class ModelConfig:
    """A whole vision-language model: which encoder, bridge and decoder, and how they meet.

    Args:
        encoder: an encoder config (``name`` selects it, e.g. ``ViTConfig``, ``CLIPConfig``).
        bridge: a bridge config (``ProjectorConfig``, ``QFormerConfig``, ``PerceiverConfig``).
        decoder: a decoder config (``HFDecoderConfig``).
        image_token_id: id of the ``<image>`` placeholder in the LM vocabulary; ``None``
            appends one new token to the LM's embeddings and uses it.
    """

    encoder: Any
    bridge: Any
    decoder: Any
    image_token_id: int | None = None
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
            extra=dict(data.get("extra", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)
