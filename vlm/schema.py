"""Dataclass configs to and from plain dicts (JSON, TOML), with errors that say how to fix them."""

from __future__ import annotations

import dataclasses
import types
import typing
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
