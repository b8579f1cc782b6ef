"""msgspec's complaint about config.toml, worded as this project's one line.

``msgspec.convert`` says ``Expected `float` > 0.0 - at `$.queue.lease_seconds```; the
user reads ``[queue] lease_seconds: must be greater than 0, got 0``, the words every
version of this project has used (tests/unit/test_config.py pins each kind). Only the
path and the field name are read from msgspec's text; what a key must be is worded
from the key's type (``Annotated`` constraints, ``Literal``, ``bool``...), so a new key
needs no message of its own. Anything unexpected keeps msgspec's own words.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Literal

import msgspec

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_FIELD = re.compile(r"^Object (?P<what>contains unknown|missing required) field `(?P<name>[^`]*)`")


class ConfigError(Exception):
    """A config file that cannot be used; the message is the whole user-facing line."""


def where(section: str, key: str | None) -> str:
    return f"[{section}] {key}" if key else f"[{section}]"


def explain(text: str, raw: dict[str, Any], root: type[msgspec.Struct]) -> str:
    """``where: what`` for msgspec's error ``text`` about ``raw`` read as ``root``,
    whose Struct-typed fields are the tables."""
    at, field = _AT.search(text), _FIELD.match(text)
    names = re.findall(r"\.([^.\[\]]+)", at.group("path")) if at else []
    cls, section, key = root, [], None
    for name in names:  # the tables down to the key; "[1]" of a list is skipped
        annotation = _types(cls).get(name)
        if not _is_table(annotation):
            key = name
            break
        section.append(name)
        cls = annotation
    if field and key is None:
        return _field(cls, section, field.group("what"), field.group("name"))
    if section and key is None:
        return f"{where('.'.join(section), None)}: must be a table"
    if section and key is not None:
        value: Any = raw
        for part in (*section, key):
            value = value[part]
        return f"{where('.'.join(section), key)}: {rule(_types(cls)[key], value)}"
    return text


def _field(cls: type[msgspec.Struct], section: list[str], what: str, name: str) -> str:
    if what == "contains unknown":
        return f"[{name}]: unknown section" if not section else \
            f"{where('.'.join(section), name)}: unknown key"
    annotation = _types(cls)[name]
    if _is_table(annotation):  # a required table left out: name its first key
        first = next(f.name for f in msgspec.structs.fields(annotation) if f.required)
        return f"{where('.'.join((*section, name)), first)}: missing (required)"
    return f"{where('.'.join(section) or name, name)}: missing (required)"


def _is_table(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)


def _types(cls: type[msgspec.Struct]) -> dict[str, Any]:
    return {f.name: f.type for f in msgspec.structs.fields(cls)}


def rule(annotation: Any, value: Any) -> str:
    """What a key of this type must be, in the words of the error line."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # Text | None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    meta: Any = None
    if typing.get_origin(annotation) is Annotated:
        annotation, meta = typing.get_args(annotation)[:2]
    got = f", got {value!r}"
    if typing.get_origin(annotation) is Literal:
        return f"must be one of {', '.join(repr(c) for c in typing.get_args(annotation))}{got}"
    if annotation is bool:
        return f"must be true or false{got}"
    if annotation is int:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be a whole number{got}"
        return f"must be at least {meta.ge}{got}"
    if annotation is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"must be a number{got}"
        if meta.gt is not None:
            return f"must be greater than {meta.gt:g}{got}"
        return f"must be {meta.ge:g} or more{got}"
    if annotation is str:
        return "must not be empty" if isinstance(value, str) else f"must be a string{got}"
    return f"must be a list of strings{got}"  # tuple[str, ...]
