"""The sections of a ``lca paper`` config (``configs/paper.yaml`` comments every key).

``task`` and ``replay`` are the sections of every config (:class:`replay.config.TaskConfig`,
:class:`replay.settings.ReplaySettings`); ``train``, ``record``, ``simulation`` and
``analysis`` are this command's own, validated by :func:`replay.validation.from_mapping` like
the rest.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from replay.config import TaskConfig, read_yaml
from replay.errors import ConfigError
from replay.settings import ReplaySettings
from replay.validation import from_mapping, key_name


@dataclass(frozen=True)
class PaperTrain:
    """The recorded training run: Adam with fairseq's inverse-square-root schedule."""

    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.0
    clip_norm: float = 0.0
    seed: int = 0
    log_every: int = 50
    threads: int = 1

    def __post_init__(self) -> None:
        for key, low in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("log_every", 1),
                         ("threads", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"{key_name(key)} must be >= {low}, got "
                                  f"{getattr(self, key)!r}")
        if not self.lr > 0:
            raise ConfigError(f"{key_name('lr')} must be > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{key_name('betas')} must be two numbers in [0, 1), got "
                              f"{self.betas!r}")
        for key in ("weight_decay", "clip_norm"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key_name(key)} must be >= 0, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class PaperRecord:
    """How the trajectories are recorded (``replay.Recorder`` arguments)."""

    keyframe_every: int = 100

    def __post_init__(self) -> None:
        if self.keyframe_every < 1:
            raise ConfigError(f"{key_name('keyframe_every')} must be >= 1")


@dataclass(frozen=True)
class Simulation:
    """§3.2: a second model trained on a subset small enough for whole-data gradients."""

    task_args: dict[str, Any] = field(default_factory=lambda: {"train_size": 512})
    steps: int = 100
    batch_size: int = 32
    lr: float | None = None
    warmup: int | None = None
    quadrature: Literal["simpson", "adaptive"] = "adaptive"
    tolerance: float = 1e-3
    max_splits: int = 8
    eval_batch_size: int | None = None
    alongside: bool = True

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "max_splits"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key_name(key)} must be >= 1")
        if not self.tolerance > 0:
            raise ConfigError(f"{key_name('tolerance')} must be > 0")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError(f"{key_name('eval_batch_size')} must be >= 1 or null")


@dataclass(frozen=True)
class Analysis:
    """How the cubes are read: Zhu et al.'s smoothing window, and BLEU's sample."""

    smooth: int = 15
    bleu_sentences: int | None = None

    def __post_init__(self) -> None:
        if self.smooth < 1:
            raise ConfigError(f"{key_name('smooth')} must be >= 1")
        if self.bleu_sentences is not None and self.bleu_sentences < 1:
            raise ConfigError(f"{key_name('bleu_sentences')} must be >= 1 or null")


@dataclass(frozen=True)
class PaperConfig:
    task: TaskConfig
    train: PaperTrain
    replay: ReplaySettings
    simulation: Simulation = field(default_factory=Simulation)
    record: PaperRecord = field(default_factory=PaperRecord)
    analysis: Analysis = field(default_factory=Analysis)
    source: str | None = field(default=None, compare=False, metadata={"internal": True})


def load_paper_config(path: str) -> PaperConfig:
    """Read and validate a ``lca paper`` config; ConfigError names the key and the file."""
    config = from_mapping(PaperConfig, read_yaml(path, "configs/paper.yaml"), path)
    rc = config.replay
    for key in ("cube", "steps"):
        if getattr(rc, key) is not None:
            raise ConfigError(f"key {key!r} in section 'replay' of {path} is set by lca paper "
                              "(cubes under --out DIR, all steps); remove it")
    if rc.gradient != "sampled":
        raise ConfigError(f"key 'gradient' in section 'replay' of {path} must be 'sampled' (the "
                          "paper's approximation; exact gradients are the simulation's)")
    missing = [d for d in ("train", "test") if rc.datasets is not None and d not in rc.datasets]
    if missing:
        raise ConfigError(f"key 'datasets' in section 'replay' of {path} must include "
                          f"{' and '.join(missing)} (the paper replays train and test)")
    names = [g.partition(":")[0] if isinstance(g, str) else g.get("name", g.get("preset"))
             for g in rc.groups or ()]
    need = [g for g in ("transformer", "sparse-dense") if g not in names]
    if "frequency" not in names:
        need.append("frequency:25")
    if need:
        raise ConfigError(f"key 'groups' in section 'replay' of {path} must include "
                          f"{', '.join(need)} (the groupings of the paper's figures and claims)")
    return dataclasses.replace(config, source=os.fspath(path))
