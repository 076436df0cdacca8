"""YAML configuration loaded into frozen dataclasses, strictly checked.

A config file has the sections ``task``, ``train``, ``record`` and ``replay`` (see
``configs/demo.yaml``, which comments every key); the ``replay`` section is
:class:`replay.settings.ReplaySettings`. Unknown keys, wrong types and out-of-range values are
rejected with a :class:`~replay.errors.ConfigError` naming the key, the section, the file and
the valid choices (:func:`replay.validation.from_mapping`). Paths inside a config are used as
written: relative paths are relative to the current working directory, not to the config file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from replay.errors import ConfigError
from replay.settings import YAML_KEYS, ReplaySettings
from replay.validation import at_least, from_mapping, key_name, positive

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

    def __post_init__(self):
        at_least(self, steps=1, batch_size=1, log_every=1)
        positive(self, "lr")
        at_least(self, momentum=0.0, weight_decay=0.0)
        if self.momentum and self.optimizer != "sgd":
            raise ConfigError(f"{key_name('momentum')} applies to optimizer 'sgd' only; "
                              f"remove it or set optimizer: sgd")


@dataclass(frozen=True)
class RecordConfig:
    """Where and how the trajectory is recorded (arguments of ``replay.Recorder``)."""

    path: str | None = None
    keyframe_every: int = 100
    every: int = 1
    mode: Literal["delta", "full"] = "delta"

    def __post_init__(self):
        at_least(self, keyframe_every=1, every=1)


@dataclass(frozen=True)
class Config:
    """A whole configuration file. ``source`` is the file it was loaded from (not a key)."""

    task: TaskConfig
    train: TrainConfig
    record: RecordConfig = field(default_factory=RecordConfig)
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    source: str | None = field(default=None, compare=False, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (for provenance and JSON)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in ("task", "train", "record")}
        out["replay"] = {k: getattr(self.replay, k) for k in YAML_KEYS}
        return out


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a YAML config file."""
    path = os.fspath(path)
    config = from_mapping(Config, read_yaml(path, "configs/demo.yaml"), path)
    return dataclasses.replace(config, source=path)


def read_yaml(path: str, example: str) -> dict:
    """The mapping in the YAML file ``path``, in the project's YAML dialect (``1e-3`` is a
    float, a duplicate key is an error); ConfigError naming the file (and ``example``, a config
    to start from, when it does not exist)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)  # a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass the path of a YAML file such "
                          f"as {example}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"cannot parse {path}{line}: {problem}") from None
    return {} if data is None else data


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
