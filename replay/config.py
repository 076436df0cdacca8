"""YAML configuration loaded into frozen dataclasses, strictly checked.

A config file has the sections ``task``, ``train``, ``record`` and ``replay`` (see
``configs/demo.yaml``, which comments every key). Unknown keys, wrong types and out-of-range
values are rejected with a :class:`~replay.errors.ConfigError` naming the key, the section,
the file and the valid choices. Paths inside a config are used as written: relative paths are
relative to the current working directory, not to the config file.

Sections are plain dataclasses; :func:`from_mapping` validates any dataclass against its type
hints (``int``, ``float``, ``str``, ``bool``, ``Literal``, ``Optional``/unions, ``list[...]``,
``dict[...]``, ``Any`` and nested dataclasses), so adding a key is adding a field. A section
may define ``check(self, where)`` for value constraints.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from replay.errors import ConfigError

# --- sections ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskConfig:
    """Which task to train and replay: ``load_task(ref, args)``."""

    ref: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation run that ``lca train`` performs and records."""

    steps: int
    lr: float
    batch_size: int = 32
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 25

    def check(self, where: str) -> None:
        _at_least(self, where, steps=1, batch_size=1, log_every=1)
        _positive(self, where, "lr")
        _at_least(self, where, momentum=0.0, weight_decay=0.0)
        if self.momentum and self.optimizer != "sgd":
            raise ConfigError(f"key 'momentum' in {where} applies to optimizer 'sgd' only; "
                              f"remove it or set optimizer: sgd")


@dataclass(frozen=True)
class RecordConfig:
    """Where and how the trajectory is recorded (arguments of ``replay.Recorder``)."""

    path: str | None = None
    keyframe_every: int = 100
    every: int = 1
    mode: Literal["delta", "full"] = "delta"

    def check(self, where: str) -> None:
        _at_least(self, where, keyframe_every=1, every=1)


@dataclass(frozen=True)
class ReplayConfig:
    """How ``lca replay`` computes the LCA cube (DESIGN §5–8)."""

    cube: str | None = None
    datasets: list[str] | None = None
    gradient: Literal["exact", "sampled"] = "exact"
    batches: int | None = None
    batch_size: int | None = None
    seed: int = 0
    quadrature: Literal["first-order", "trapezoid", "simpson", "adaptive"] = "simpson"
    tolerance: float = 1e-3
    max_splits: int = 32
    groups: list[str | dict[str, Any]] = field(default_factory=lambda: ["tensor"])
    scheduler: str = "local"
    chunk_size: int | None = None
    precision: Literal["float32", "float64"] = "float32"
    steps: str | None = None
    threads: int = 1
    device: str = "cpu"
    nonfinite: Literal["error", "skip"] = "error"

    def check(self, where: str) -> None:
        _positive(self, where, "tolerance")
        _at_least(self, where, max_splits=1, batches=1, batch_size=1, chunk_size=1, threads=1)
        if self.gradient == "sampled":
            for key in ("batches", "batch_size"):
                if getattr(self, key) is None:
                    raise ConfigError(f"gradient 'sampled' in {where} needs key {key!r} "
                                      f"(mini-batches per step and their size); set it")
        if self.steps is not None and not re.fullmatch(r"\d*:\d*", self.steps):
            raise ConfigError(f"key 'steps' in {where} must look like 'A:B', 'A:' or ':B' "
                              f"(recorded step numbers), got {self.steps!r}")
        if not self.groups:
            raise ConfigError(f"key 'groups' in {where} must list at least one grouping, "
                              f"e.g. [tensor]")


@dataclass(frozen=True)
class Config:
    """A whole configuration file. ``source`` is the file it was loaded from (not a key)."""

    task: TaskConfig
    train: TrainConfig
    record: RecordConfig = field(default_factory=RecordConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    source: str | None = field(default=None, compare=False, metadata={"internal": True})

    def cube_path(self) -> str | None:
        """``replay.cube``; None lets the replay name it beside the trajectory
        (``lca-<exact|sampled>.zarr``)."""
        return self.replay.cube

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (for provenance and JSON)."""
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in _keys(Config)}


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a YAML config file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)  # a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass the path of a YAML file such "
                          f"as configs/demo.yaml") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"cannot parse {path}{line}: {problem}") from None
    config = from_mapping(Config, {} if data is None else data, path)
    return dataclasses.replace(config, source=path)


# --- generic validation -----------------------------------------------------------------------


def from_mapping(cls: type, mapping: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``mapping``, checking keys and types against its fields.

    ``where`` names the mapping in messages (a file, or "section 'train' of FILE"). Fields
    typed as dataclasses are built recursively as sections. Raises ConfigError.
    """
    keys = {f.name: f for f in _keys(cls)}
    hints = typing.get_type_hints(cls)
    sections = all(dataclasses.is_dataclass(hints[name]) for name in keys)
    noun = "section" if sections else "key"
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where} must be a mapping of {noun}s to values, "
                          f"got {_describe_value(mapping)}")
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
        try:
            values[name] = _convert(value, tp)
        except _Mismatch:
            raise ConfigError(f"key {name!r} in {where} must be {_describe_type(tp)}, "
                              f"got {_describe_value(value)}") from None
    obj = cls(**values)
    if callable(getattr(obj, "check", None)):
        obj.check(where)
    return obj


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
            return (origin or tp)(_convert(v, item) for v in value)
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


def _describe_type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if _is_union(tp):
        return " or ".join(_describe_type(a) for a in args)
    if origin in (list, tuple) and args and args[0] is not Any:
        inner = args[0]
        alternatives = typing.get_args(inner) if _is_union(inner) else (inner,)
        nouns = [_PLURALS.get(typing.get_origin(a) or a) for a in alternatives]
        if all(nouns):
            return "a list of " + " or ".join(nouns)
        return f"a list of ({_describe_type(inner)})"
    return _NAMES.get(origin or tp, "anything" if tp is Any else repr(tp))


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _describe_value(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string",
            type(None): "null", list: "list", dict: "mapping"}.get(type(value))
    return f"{value!r} ({kind or type(value).__name__})"


def _keys(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")]


def _at_least(obj: Any, where: str, **minimum: float) -> None:
    for key, low in minimum.items():
        value = getattr(obj, key)
        if value is not None and value < low:
            raise ConfigError(f"key {key!r} in {where} must be >= {low}, got {value!r}")


def _positive(obj: Any, where: str, key: str) -> None:
    value = getattr(obj, key)
    if not value > 0:
        raise ConfigError(f"key {key!r} in {where} must be > 0, got {value!r}")


# --- YAML dialect -----------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``) and rejects
    duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
