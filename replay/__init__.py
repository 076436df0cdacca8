"""lca-replay: Loss Change Allocation by offline checkpoint replay.

Public API (imported lazily so that `lca --help` does not pay for torch):

- :class:`Recorder` — record a training run into a trajectory store.
- :func:`open_trajectory` — read a trajectory store.
- :func:`run` — replay a trajectory into an LCA cube (xarray Dataset, zarr on disk).
- :class:`Sampled` — the sampled (mini-batch) gradient mode.
- :class:`ReplaySettings` — every setting of a replay, with defaults and checks.
- :func:`prepare` — validate a replay and create (or check) its cube without computing.
- :func:`load_param_lca` — per-parameter cumulative LCA saved with a cube.
- :class:`Task`, :func:`load_task` — how a replay rebuilds the model, data and loss.
- :func:`resolve_groupings`, :class:`Grouping` — parameter groupings (presets and YAML rules).
"""

from __future__ import annotations

import importlib

__version__ = "0.3.0"

_API = {
    "Recorder": "replay.record.recorder",
    "open_trajectory": "replay.store.trajectory",
    "Trajectory": "replay.store.trajectory",
    "TrajectoryError": "replay.errors",
    "ReplayError": "replay.errors",
    "Task": "replay.task",
    "load_task": "replay.task",
    "run": "replay.engine.driver",
    "prepare": "replay.engine.driver",
    "resolve_groupings": "replay.grouping.resolve",
    "Grouping": "replay.grouping.partition",
    "LCAError": "replay.errors",
    "CubeError": "replay.errors",
    "ConfigError": "replay.errors",
    "TaskError": "replay.errors",
    "GroupingError": "replay.errors",
    "Sampled": "replay.settings",
    "ReplaySettings": "replay.settings",
    "load_param_lca": "replay.cube.param_lca",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'replay' has no attribute {name!r}")


def __dir__():
    return __all__
