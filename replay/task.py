"""The Task protocol: everything a replay needs to rebuild the computation of a training run.

A task is referenced as ``"package.module:Factory"`` plus JSON-serialisable keyword arguments;
``Factory(**args)`` must return an object implementing :class:`Task`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from replay.errors import TaskError


@runtime_checkable
class Task(Protocol):
    """What the replay engine calls. Optional, and not part of this protocol's checks:
    ``token_counts()`` (per-row frequencies, for the ``frequency`` grouping), ``item_size(item)``
    (a number that grows with an item's cost in a padded batch, e.g. its length in tokens:
    exact mode then batches items of similar size together), ``eval_batch_size``, and
    ``record_args() -> dict``: the JSON arguments that rebuild this very task, for tasks whose
    constructor arguments alone do not pin it down (data read from the machine, a tokenizer
    trained on first use): e.g. the constructor's arguments plus a fingerprint of the data and
    the path and sha256 of a file the task wrote. Whoever records a trajectory (``lca train``,
    ``lca paper``) stores ``record_args()`` as its task arguments when the task has it
    (:func:`recorded_args`); given them back, the task must rebuild the same computation or
    raise TaskError.

    The model is put in eval mode by the engine, so the loss is deterministic and
    ``L(θ; D) = Σ loss_sum / Σ count`` over batches is exact for any batch size.
    """

    def build_model(self) -> Any:
        """A fresh ``torch.nn.Module`` with the recorded architecture (values are overwritten)."""

    def datasets(self) -> Mapping[str, Sequence]:
        """Dataset name -> indexable sequence of items."""

    def collate(self, items: Sequence) -> Any:
        """Items -> a batch (tensors, or tuples/lists/dicts of tensors)."""

    def loss(self, model: Any, batch: Any) -> tuple[Any, Any]:
        """(sum of per-item losses as a 0-d tensor, number of items or tokens)."""


def load_task(ref: str, args: Mapping[str, Any] | None = None) -> Task:
    """Import ``"package.module:Factory"`` and return ``Factory(**args)``."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise TaskError(
            f"task reference {ref!r} is not of the form 'package.module:Factory' "
            "(e.g. 'replay.tasks.toy_nmt:ToyNMT')"
        )
    module_name, attr = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise TaskError(
            f"cannot import task module {module_name!r} of {ref!r}: {err}; "
            "install it or put it on PYTHONPATH"
        ) from err
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise TaskError(f"module {module_name!r} has no attribute {attr!r} (task {ref!r})") from None
    args = dict(args or {})
    try:
        json.dumps(args)
    except TypeError as err:
        raise TaskError(f"task arguments for {ref!r} must be JSON-serialisable: {err}") from None
    try:
        task = factory(**args)
    except TypeError as err:
        raise TaskError(f"task {ref!r} rejected its arguments {sorted(args)}: {err}") from err
    missing = [m for m in ("build_model", "datasets", "collate", "loss")
               if not callable(getattr(task, m, None))]
    if missing:
        raise TaskError(f"task {ref!r} does not implement {', '.join(missing)} (see replay.Task)")
    return task


def recorded_args(task: Any, args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The task arguments to store with a trajectory: ``task.record_args()`` if the task has
    that hook, else ``args`` (the arguments it was built from)."""
    hook = getattr(task, "record_args", None)
    out = dict(hook()) if callable(hook) else dict(args or {})
    try:
        json.dumps(out)
    except TypeError as err:
        raise TaskError(f"{type(task).__name__}.record_args() must return JSON data: {err}") from None
    return out


def task_reference(obj: Any) -> str:
    """The ``module:qualname`` reference of a task class or factory."""
    return f"{obj.__module__}:{obj.__qualname__}"
