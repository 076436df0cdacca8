"""Gradient modes (docs/design.md §5): the whole dataset, or a seeded mini-batch sample per step.

:class:`LossOracle` evaluates L(θ; D) and ∇L(θ; D) for every dataset at the parameters
currently held by a :class:`replay.engine.flat_model.FlatModel`.
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from replay.engine.quadrature import Point
from replay.errors import ReplayError, TaskError
from replay.settings import Sampled


def sample_indices(mode: Sampled, dataset: str, n_items: int, step: int) -> list[np.ndarray]:
    """The ``mode.batches`` index arrays drawn for (seed, dataset, step); without replacement
    inside a batch, independently across batches (a bootstrap of mini-batches)."""
    key = [mode.seed, zlib.crc32(dataset.encode()), int(step)]
    rng = np.random.default_rng(np.random.SeedSequence(key))
    size = min(mode.batch_size, n_items)
    return [np.sort(rng.choice(n_items, size=size, replace=False)) for _ in range(mode.batches)]


def sorts_by_size(task) -> bool:
    """Whether the replay batches this task's items by size (it has ``item_size``)."""
    return callable(getattr(task, "item_size", None))


def plan_batches(task, name: str, items: Sequence, batch_size: int,
                 indices: np.ndarray | None = None) -> list[np.ndarray]:
    """The index arrays of the batches a replay evaluates: all of dataset ``name`` (exact mode)
    or the ``indices`` of a step's sample (sampled mode, its mini-batches pooled), in batches
    of at most ``batch_size`` items.

    A task with ``item_size(item)`` (e.g. a sentence's length in tokens) has the items sorted
    by size, ties in the given order, so that each batch holds items of similar size and a
    padded batch wastes little work on padding (docs/benchmarks.md gives the gain on the demo's
    Transformer). Without it, the given order. Any batching gives the same L and ∇L up to float
    rounding; this one is fixed by the task, the items and ``batch_size`` alone, so no
    chunking or worker count changes it.
    """
    order = np.arange(len(items)) if indices is None else np.asarray(indices, dtype=np.int64)
    if sorts_by_size(task):
        sizes = np.empty(len(order))
        for k, i in enumerate(order):
            size = task.item_size(items[int(i)])
            if (not isinstance(size, numbers.Real) or isinstance(size, bool)
                    or not math.isfinite(size)):
                raise TaskError(
                    f"task item_size() returned {size!r} for item {int(i)} of dataset {name!r}; "
                    "it must return a finite number (e.g. the item's length in tokens)")
            sizes[k] = size
        order = order[np.argsort(sizes, kind="stable")]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def to_device(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move every tensor in a nested batch to ``device``; floating tensors take ``dtype``."""
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device=device)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device, dtype) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device, dtype) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device, dtype) for v in batch)
    return batch


# Collated samples drawn ahead of a piece's steps (LossOracle.prefetch), at most this much.
AHEAD_BYTES = 64 << 20


def _nbytes(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, Mapping):
        return sum(_nbytes(v) for v in batch.values())
    if isinstance(batch, list | tuple):
        return sum(_nbytes(v) for v in batch)
    return 0


class LossOracle:
    """L(θ; D) and ∇L(θ; D) for each named dataset, exact or on the step's sample.

    Exact mode collates each dataset once, in the batches of :func:`plan_batches`, and keeps
    them for the oracle's lifetime (one task's chunk of steps): the data loop is the replay's
    hot path. Sampled mode pools a step's mini-batches into batches of ``batch_size`` items
    (the loss is the pooled mean either way): small batches pay torch's per-operation
    overhead once per batch, so fewer, larger batches cost less for the same items.
    """

    def __init__(self, task, flat, datasets: Sequence[str], mode: Sampled | None,
                 batch_size: int):
        self.task, self.flat, self.mode, self.batch_size = task, flat, mode, batch_size
        self.names = list(datasets)
        available = task.datasets()
        self.items = {}
        for name in self.names:
            if name not in available:
                raise ReplayError(
                    f"dataset {name!r} is not provided by the task; it provides "
                    f"{', '.join(sorted(available))}"
                )
            items = available[name]
            if len(items) == 0:
                raise ReplayError(f"dataset {name!r} is empty; remove it from datasets=")
            self.items[name] = items
        self._exact_cache: dict[str, list] = {}
        self._batches: dict[str, list] = {}
        self._ahead: dict[int, dict[str, list]] = {}
        self.step: int | None = None

    def prefetch(self, steps, max_bytes: int = AHEAD_BYTES) -> None:
        """Draw and collate the samples of ``steps`` now (sampled mode), as many as fit in
        ``max_bytes``, for :meth:`prepare` to take. Done together, before a piece's model passes
        rather than between them, this bookkeeping runs with the interpreter's caches warm
        (docs/benchmarks.md, ``bench_cold_ops.py``); the batches are the same."""
        self._ahead = {}
        used = 0
        for step in steps if self.mode is not None else ():
            if used >= max_bytes:
                break
            try:
                batches = {name: self._sampled(name, int(step)) for name in self.names}
            except Exception:  # raised again by prepare(), at the step whose data fails
                break
            used += sum(_nbytes(b) for bs in batches.values() for b in bs)
            self._ahead[int(step)] = batches

    def prepare(self, step: int) -> None:
        """Select the data for the interval starting at ``step``."""
        self.step = step
        ahead = self._ahead.pop(step, None)
        for name in self.names:
            if self.mode is None:
                if name not in self._exact_cache:
                    self._exact_cache[name] = [
                        self._collate(name, idx) for idx in
                        plan_batches(self.task, name, self.items[name], self.batch_size)]
                self._batches[name] = self._exact_cache[name]
            else:
                self._batches[name] = ahead[name] if ahead is not None else \
                    self._sampled(name, step)

    def _sampled(self, name: str, step: int) -> list:
        sample = np.concatenate(sample_indices(self.mode, name, len(self.items[name]), step))
        return [self._collate(name, idx) for idx in
                plan_batches(self.task, name, self.items[name], self.batch_size, sample)]

    def _collate(self, name, indices):
        items = self.items[name]
        batch = self.task.collate([items[int(i)] for i in indices])
        return to_device(batch, self.flat.device, self.flat.dtype)

    def evaluate(self, need_grad: bool, take=None) -> Point:
        """Loss (and gradient when ``need_grad``) at the FlatModel's current θ.

        ``take(d, g)``, when given, receives dataset d's gradient as soon as it is computed,
        in the FlatModel's own gradient buffer (valid until the next dataset's backward pass),
        and returns what the Point keeps of it (a tensor, or None); without it the Point keeps
        a copy of each gradient.
        """
        # Between two model passes every operation runs with the interpreter's caches cold
        # (docs/benchmarks.md, bench_cold_ops.py): this loop does as few as it can.
        losses = []
        grads = [] if need_grad else None
        model, flat = self.flat.model, self.flat
        with torch.set_grad_enabled(need_grad):
            for d, name in enumerate(self.names):
                if need_grad:
                    flat.grad.zero_()
                total, count = 0.0, 0.0
                for batch in self._batches[name]:
                    loss_sum, n = self.task.loss(model, batch)
                    if need_grad:
                        loss_sum.backward()
                    total += loss_sum.item()
                    count += float(n)
                if count <= 0:
                    raise ReplayError(
                        f"task loss returned a total count of {count} on dataset {name!r} at "
                        f"step {self.step}; loss() must return (sum of losses, number of "
                        "items/tokens)")
                losses.append(total / count)
                if need_grad:
                    flat.check_bound()
                    if take is None:
                        grads.append(flat.grad / count)
                    else:  # divided in place: the same rounding as the copy above
                        grads.append(take(d, flat.grad.div_(count)))
        if grads is not None and all(g is None for g in grads):
            grads = None
        return Point(np.array(losses), grads)
