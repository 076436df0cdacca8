"""Checking values against the fields of a dataclass, with messages in the user's own words.

Types come from the type hints (``int``, ``float``, ``str``, ``bool``, ``Literal``, unions,
``list``/``tuple``/``dict`` of those, ``Any`` and nested dataclasses); value rules from each
class's ``__post_init__``. A setting reaches the code from a YAML file, a Python call or a
command-line flag, and an error must name it the way the user wrote it (``key 'threads' in
section 'replay' of run.yaml``, ``replay.run(threads=...)``, ``--threads``): the front end sets
the :func:`naming` while the dataclass is built, and rules phrase their messages with
:func:`key_name` / :func:`short_name`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from replay.errors import ConfigError

# (full name, short name) of a field: "key 'x' in section 'replay' of F" and "key 'x'".
_NAMING: contextvars.ContextVar[tuple[Callable[[str], str], Callable[[str], str]]] = \
    contextvars.ContextVar("naming", default=(lambda k: f"setting {k!r}", lambda k: repr(k)))


@contextlib.contextmanager
def naming(full: Callable[[str], str], short: Callable[[str], str] | None = None):
    """Within the block, fields are named ``full(name)`` in messages (``short(name)`` when a
    message names a second field of the same source)."""
    token = _NAMING.set((full, short or full))
    try:
        yield
    finally:
        _NAMING.reset(token)


def key_name(key: str) -> str:
    return _NAMING.get()[0](key)


def short_name(key: str) -> str:
    return _NAMING.get()[1](key)


def from_mapping(cls: type, mapping: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``mapping``, checking keys and types against its fields.

    ``where`` names the mapping in messages (a file, or "section 'train' of FILE"). Fields
    typed as dataclasses are built recursively as sections. Raises ConfigError.
    """
    keys = {f.name: f for f in fields(cls) if f.metadata.get("yaml", True)}
    hints = _hints(cls)
    sections = all(dataclasses.is_dataclass(hints[name]) for name in keys)
    noun = "section" if sections else "key"
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where} must be a mapping of {noun}s to values, "
                          f"got {describe_value(mapping)}")
    for key in mapping:
        if key not in keys:
            raise ConfigError(f"unknown {noun} {key!r} in {where}; "
                              f"valid {noun}s: {', '.join(sorted(keys))}")
    values = {}
    for name, f in keys.items():
        if name not in mapping:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing {noun} {name!r} in {where}")
            continue
        tp, value = hints[name], mapping[name]
        if dataclasses.is_dataclass(tp):
            values[name] = from_mapping(tp, {} if value is None else value,
                                        f"section {name!r} of {where}")
            continue
        values[name] = convert_field(name, value, tp, f"key {name!r} in {where}")
    with naming(lambda k: f"key {k!r} in {where}", lambda k: f"key {k!r}"):
        return cls(**values)


def fields(cls: type) -> list[dataclasses.Field]:
    """The fields a user may set (``init``, not marked ``internal``); :func:`from_mapping` also
    leaves out those whose metadata says ``yaml: False``."""
    return [f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")]


@functools.cache
def _hints(cls: type) -> dict:
    # Evaluating a class's string annotations costs milliseconds; settings are checked on
    # every replay (and every task), their classes never change.
    return typing.get_type_hints(cls)


@functools.cache
def _fields(cls: type) -> tuple[dataclasses.Field, ...]:
    return tuple(fields(cls))


def check_types(obj: Any) -> None:
    """Convert every user field of the (frozen) dataclass ``obj`` to its declared type in place
    (int widened to float, lists to tuples where declared), or raise ConfigError naming it."""
    hints = _hints(type(obj))
    for f in _fields(type(obj)):
        value = getattr(obj, f.name)
        converted = convert_field(f.name, value, hints[f.name], key_name(f.name))
        if converted is not value:
            object.__setattr__(obj, f.name, converted)


def convert_field(name: str, value: Any, tp: Any, label: str) -> Any:
    try:
        return _convert(value, tp)
    except _Mismatch:
        raise ConfigError(f"{label} must be {describe_type(tp)}, got {describe_value(value)}") \
            from None


class _Mismatch(Exception):
    pass


def _convert(value: Any, tp: Any) -> Any:
    """``value`` checked (and int→float widened) against type ``tp``, or raise _Mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
    elif _is_union(tp):
        for alternative in args:
            try:
                return _convert(value, alternative)
            except _Mismatch:
                pass
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp in (list, tuple) or origin in (list, tuple):
        if isinstance(value, list | tuple):
            item = args[0] if args else Any
            out = (origin or tp)(_convert(v, item) for v in value)
            return value if out == value and type(out) is type(value) else out
    elif tp is dict or origin is dict:
        if isinstance(value, Mapping):
            k_tp, v_tp = args if args else (Any, Any)
            return {_convert(k, k_tp): _convert(v, v_tp) for k, v in value.items()}
    else:
        raise TypeError(f"config fields of type {tp!r} are not supported")
    raise _Mismatch


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          type(None): "null", dict: "a mapping", list: "a list", tuple: "a list"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings",
            dict: "mappings"}


def describe_type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if _is_union(tp):
        return " or ".join(describe_type(a) for a in args)
    if origin in (list, tuple) and args and args[0] is not Any:
        inner = args[0]
        alternatives = typing.get_args(inner) if _is_union(inner) else (inner,)
        nouns = [_PLURALS.get(typing.get_origin(a) or a) for a in alternatives]
        if all(nouns):
            return "a list of " + " or ".join(nouns)
        return f"a list of ({describe_type(inner)})"
    return _NAMES.get(origin or tp, "anything" if tp is Any else repr(tp))


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def describe_value(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string",
            type(None): "null", list: "list", tuple: "list", dict: "mapping"}.get(type(value))
    return f"{value!r} ({kind or type(value).__name__})"


def at_least(obj: Any, **minimum: float) -> None:
    """Raise ConfigError unless each named field is None or >= its minimum."""
    for key, low in minimum.items():
        value = getattr(obj, key)
        if value is not None and value < low:
            raise ConfigError(f"{key_name(key)} must be >= {low}, got {value!r}")


def positive(obj: Any, key: str) -> None:
    value = getattr(obj, key)
    if not value > 0:
        raise ConfigError(f"{key_name(key)} must be > 0, got {value!r}")
