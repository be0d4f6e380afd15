"""``--set a.b.c=value``: a recipe key overridden from the command line, its value read as the
key's dataclass field says.

Values are TOML (``3e-4``, ``true``, ``["vqa"]``, ``{r = 8}``) or else plain text, then checked
against the field's annotation before anything is built, with one message naming the key, the
type it takes and the value: ``--set run.max_steps=ten: expected int, got 'ten'``. A bare
``null`` (or ``none``) unsets an optional key (``model.encoder.checkpoint=null``); a key that is
not optional refuses it. Text fields take the text as written (``run.out=2024`` is ``"2024"``);
quote it to keep a word such as ``null`` (``--set 'run.device="null"'``).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from vlm.config import ModelConfig, ProcessorConfig
from vlm.registry import BRIDGES, DECODERS, ENCODERS, TILINGS, Registry
from vlm.schema import ConfigError

_NOT_A_PART = Registry("part")  # names nothing

#: The bare words that unset an optional key.
NULL = ("null", "none")

#: The parts of a config typed ``Any`` in their dataclass: the part's ``name`` picks its own
#: dataclass from the registry.
PARTS: dict[type, dict[str, Registry]] = {
    ModelConfig: {"encoder": ENCODERS, "bridge": BRIDGES, "decoder": DECODERS},
    ProcessorConfig: {"tiling": TILINGS},
}


class _Mismatch(Exception):
    """A value that is not of the type asked for; inside an inline table, ``path`` names the
    key (``.r``) whose value (``value``) is not a ``hint``."""

    def __init__(self, path: str = "", hint: Any = None, value: Any = None):
        super().__init__(path)
        self.path, self.hint, self.value = path, hint, value


def parse_value(text: str) -> Any:
    """A command-line value as TOML (numbers, booleans, lists, tables); else a plain string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str], tables: Mapping[str, type]) -> None:
    """Applies ``key=value`` overrides to a recipe dict, each value checked against its key's
    field in ``tables`` (``{"run": RunConfig, ...}``).

    All are placed first, then checked, so that a key's type may depend on another override
    (``model.encoder.name=clip`` picks the fields ``model.encoder.*`` has). A part whose ``name``
    an override changes drops the recipe's keys the new kind does not have
    (``model.processor.tiling.name=none`` on a recipe that splits images). A key the dataclasses
    do not have is placed as parsed: building the recipe names it with the keys that exist.
    """
    placed: dict[str, tuple[dict[str, Any], list[str], str]] = {}
    renamed: list[tuple[dict[str, Any], list[str]]] = []
    for assignment in overrides:
        key, sep, text = assignment.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {assignment!r}")
        parts = key.split(".")
        node = _table(tree, parts)
        if parts[-1] == "name" and node.get("name", parse_value(text)) != parse_value(text):
            renamed.append((node, parts))
        node[parts[-1]] = parse_value(text)
        placed[key] = (node, parts, text)  # the last assignment of a key wins
    for node, parts in renamed:
        kind, _ = field_type(tree, parts[:-1], tables)
        if dataclasses.is_dataclass(kind):
            known = {f.name for f in dataclasses.fields(kind)}
            prefix = ".".join(parts[:-1]) + "."
            for key in [k for k in node if k not in known and prefix + k not in placed]:
                del node[key]
    for key, (node, parts, text) in placed.items():
        if parts[-1] == "name" and text in _registry_of(tree, parts[:-1], tables).names():
            node["name"] = text  # a kind, even one called "none" (tiling)
            continue
        hint, default = field_type(tree, parts, tables)
        node[parts[-1]] = typed_value(key, text, hint, default)


def _registry_of(tree: dict[str, Any], parts: list[str], tables: Mapping[str, type]) -> Registry:
    """The registry of the part at ``parts`` (``["model", "processor", "tiling"]``: the tilings);
    an empty one where ``parts`` is not a part."""
    if len(parts) < 2:
        return _NOT_A_PART
    container, _ = field_type(tree, parts[:-1], tables)
    return PARTS.get(_optional_member(container), {}).get(parts[-1], _NOT_A_PART)


def _table(tree: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """The table that holds key ``parts``; model tables are made when missing (they may be
    sparse, e.g. ``hf_config``), any other must exist."""
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None and parts[0] == "model":
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"--set {'.'.join(parts)}: {'.'.join(parts[: i + 1])!r} is not a table of the recipe"
            )
        node = child
    return node


def field_type(tree: dict[str, Any], parts: list[str], tables: Mapping[str, type]) -> tuple[Any, Any]:
    """The annotation and default of recipe key ``parts`` (``["run", "max_steps"]``), read
    from the dataclasses' fields; ``(Any, MISSING)`` where they do not say."""
    hint, default, node = tables.get(parts[0], Any), dataclasses.MISSING, tree.get(parts[0])
    for name in parts[1:]:
        hint, default = _optional_member(hint), dataclasses.MISSING
        registry = PARTS.get(hint, {}).get(name)
        if registry is not None:  # typed Any: its name picks the dataclass
            part = node.get(name) if isinstance(node, dict) else None
            part_name = part.get("name") if isinstance(part, dict) else None
            hint = registry.config_class(part_name) if part_name in registry.names() else Any
        elif dataclasses.is_dataclass(hint):
            fields = {f.name: f for f in dataclasses.fields(hint)}
            if name not in fields:
                return Any, dataclasses.MISSING
            hint, default = typing.get_type_hints(hint)[name], _default(fields[name])
        elif typing.get_origin(hint) is dict:
            hint = typing.get_args(hint)[1]
        else:
            return Any, dataclasses.MISSING
        node = node.get(name) if isinstance(node, dict) else None
    return hint, default


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _members(hint: Any) -> tuple[Any, ...]:
    """The types of a union (``int | None``: ``(int, NoneType)``); ``(hint,)`` otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _optional_member(hint: Any) -> Any:
    members = [m for m in _members(hint) if m is not type(None)]
    return members[0] if len(members) == 1 else hint


def typed_value(key: str, text: str, hint: Any, default: Any = dataclasses.MISSING) -> Any:
    """``text`` read as ``hint`` says; a ``ConfigError`` naming the key, the type and the value
    when it is not one."""
    if text.lower() in NULL:
        if hint is Any or type(None) in _members(hint):
            return None
        shown = "" if default is dataclasses.MISSING else f"; its default is {default!r}"
        quote = f"; for the word itself, quote it: --set '{key}=\"{text}\"'" if str in _members(hint) else ""
        raise ConfigError(
            f"--set {key}={text}: {key} cannot be unset, it takes {describe(hint)}{shown}{quote}"
        )
    value = parse_value(text)
    try:
        return _check(value, hint, text)
    except _Mismatch as err:
        if err.path:
            where, hint, value = f"{key}{err.path}: ", err.hint, err.value
        else:
            where = ""
        raise ConfigError(f"--set {key}={text}: {where}expected {describe(hint)}, got {value!r}") from None


def _check(value: Any, hint: Any, text: str | None = None) -> Any:
    """``value`` as type ``hint`` (an int as a float, TOML's lists for tuples); ``text``, when
    given, is how it was written, which a ``str`` field takes as it is."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        # Text last: "str | list[str]" reads ["a", "b"] as the list, not as the text of it.
        inner = _Mismatch()
        for member in sorted(args, key=lambda m: m is str):
            try:
                return _check(value, member, text)
            except _Mismatch as err:
                inner = err if err.path else inner  # a table's key: the most precise
        raise inner
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        if text is not None and not isinstance(value, list | dict):  # 2024, true: the text as written
            return text
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            return [_check(v, a) for v, a in zip(value, args)]
        item = args[0] if args else Any
        return [_check(v, item) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        item = args[1] if len(args) == 2 else Any
        return {k: _check(v, item) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):  # an inline table: its known keys checked, others named later
        if not isinstance(value, dict):
            raise _Mismatch
        hints, table = typing.get_type_hints(hint), {}
        for k, v in value.items():
            try:
                table[k] = _check(v, hints[k]) if k in hints else v
            except _Mismatch as err:
                raise _Mismatch(
                    f".{k}{err.path}", err.hint or hints[k], err.value if err.path else v
                ) from None
        return table
    return value  # a type this reader does not know: the dataclass takes it as it is


def describe(hint: Any) -> str:
    """A type as a message shows it: ``int``, ``list[str]``, ``bool (true or false)``."""
    members = _members(hint)
    if len(members) > 1:
        shown = [describe(m) for m in members if m is not type(None)]
        return " or ".join(shown + (["null"] if type(None) in members else []))
    if hint is bool:
        return "bool (true or false)"
    if dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} table ({{key = value, ...}})"
    if typing.get_origin(hint) is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))
