"""Name registries for encoders, bridges, decoders and tilings.

Adding a part is one file that decorates its class with ``@register_encoder("name", Config)``
(or ``register_bridge`` / ``register_decoder``) plus one import line in its package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlm.schema import ConfigError, parse_dataclass


class Registry:
    """Maps a name to the class that builds a part and the dataclass that configures it."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, tuple[type, type]] = {}

    def register(self, name: str, config_cls: type) -> Callable[[type], type]:
        def decorator(cls: type) -> type:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = (cls, config_cls)
            return cls

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def _entry(self, name: Any) -> tuple[type, type]:
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {', '.join(self.names())}. "
                f"Fix {self.kind}.name, or register a new one with @register_{self.kind}."
            )
        return self._entries[name]

    def config_class(self, name: Any) -> type:
        """The dataclass that configures the part registered as ``name``."""
        return self._entry(name)[1]

    def parse(self, data: dict[str, Any] | Any) -> Any:
        """A config dataclass from a dict (its ``name`` picks the class); dataclasses pass through."""
        if not isinstance(data, dict):
            self._entry(getattr(data, "name", None))
            return data
        _, config_cls = self._entry(data.get("name"))
        return parse_dataclass(config_cls, data, where=f"{self.kind} {data['name']!r}")

    def get(self, config: Any) -> type:
        """The class registered under ``config.name``."""
        return self._entry(getattr(config, "name", None))[0]

    def build(self, config: Any, **kwargs: Any) -> Any:
        return self.get(config)(config, **kwargs)


ENCODERS = Registry("encoder")
BRIDGES = Registry("bridge")
DECODERS = Registry("decoder")
TILINGS = Registry("tiling")

register_encoder = ENCODERS.register
register_bridge = BRIDGES.register
register_decoder = DECODERS.register
register_tiling = TILINGS.register
