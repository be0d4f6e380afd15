"""Configs: nested dataclasses, one per part, serialised to JSON next to the weights.

Each part (encoder, bridge, decoder) has its own dataclass; its ``name`` picks the
registry entry that builds it (see ``vlm.registry``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration vlm cannot build; the message says how to fix it."""


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def parse_dataclass(cls: type, data: dict[str, Any], *, where: str) -> Any:
    """Builds dataclass ``cls`` from a plain dict, recursing into nested dataclasses.

    Unknown keys fail fast with the key's name and the keys that exist.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known keys are: {', '.join(known)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = _unwrap_optional(hints[key])
        if isinstance(value, dict) and dataclasses.is_dataclass(hint):
            value = parse_dataclass(hint, value, where=f"{where}.{key}")
        elif isinstance(value, list) and typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) dataclass config."""
    return dataclasses.asdict(config)


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
        # Imported here: the registries import this module for ConfigError and parsing.
        from vlm.registry import BRIDGES, DECODERS, ENCODERS

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
