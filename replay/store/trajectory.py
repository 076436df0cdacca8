"""Reading a trajectory store (formats 1 and 2, docs/design.md §2): θ_t at every recorded step, bit-exact.

A store is a directory or fsspec URL with ``manifest.json`` (see :mod:`replay.store.manifest`),
``keyframes/`` (full θ_t), ``deltas/`` (Δ to the next recorded step plus sparse corrections,
see :mod:`replay.store.codec`; one flat tensor per dtype group in format 2, one per parameter in 1)
and ``state/`` (frozen parameters and buffers). Only safetensors and JSON are read, whole files
at a time, each checked against its sha256 and size in the manifest.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Iterator

import safetensors.torch
import torch

from replay.store.codec import (
    PARAM_DTYPES, STATE_DTYPES, check_delta_payload, check_tensors, header_metadata,
)
from replay.errors import TrajectoryError
from replay.store.flat_layout import FlatLayout, Flats
from replay.store.manifest import (FORMAT_VERSION, MANIFEST, Source, digest_problem,
                                   read_manifest)
from replay.store.rebuild import RebuildPlan

__all__ = ["FORMAT_VERSION", "Trajectory", "open_trajectory"]

Tensors = dict[str, torch.Tensor]


def open_trajectory(path: str | os.PathLike) -> Trajectory:
    """Open the store at ``path`` (local directory or fsspec URL); validates manifest.json."""
    return Trajectory(path)


class Trajectory:
    """A recorded training run: parameters θ_t (CPU, recorded dtype) at the recorded steps t.

    Attributes: ``path``, ``manifest`` (parsed), ``manifest_sha256``, ``names`` (recorded
    trainable parameters, canonical order), ``shapes``, ``dtypes``, ``aliases`` (tied alias ->
    canonical name), ``state_names`` (frozen parameters and buffers), ``steps`` (ascending),
    ``keyframe_steps``, ``mode``, ``every``, ``keyframe_every``, ``task``, ``task_args``.
    Returned tensors are fresh copies owned by the caller (:meth:`walk_flat` shares its own).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._source = Source(self.path)
        self.manifest, raw = read_manifest(self._source)
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        m = self.manifest
        self.names = [p["name"] for p in m["params"]]
        self.shapes = {p["name"]: tuple(p["shape"]) for p in m["params"] + m["state"]}
        self.dtypes = {p["name"]: PARAM_DTYPES[p["dtype"]] for p in m["params"]}
        self.state_dtypes = {p["name"]: STATE_DTYPES[p["dtype"]] for p in m["state"]}
        self.aliases = dict(m["aliases"])
        self.state_names = [p["name"] for p in m["state"]]
        self.mode, self.every, self.keyframe_every = m["mode"], m["every"], m["keyframe_every"]
        self.task, self.task_args = m.get("task"), dict(m.get("task_args") or {})
        self._entries = {e["step"]: e for e in m["steps"]}
        self.steps = [e["step"] for e in m["steps"]]
        self.plan = RebuildPlan(self.steps, {t: e["files"] for t, e in self._entries.items()},
                                self.path)
        self.keyframe_steps = self.plan.keyframes
        self._param_shapes = {n: self.shapes[n] for n in self.names}
        self.format_version = m["format_version"]
        self.layout = FlatLayout([(n, self.shapes[n], self.dtypes[n]) for n in self.names])
        self._state_shapes = {n: self.shapes[n] for n in self.state_names}
        self._cache: tuple[int, Flats, Tensors] | None = None   # last reconstructed step

    def __repr__(self) -> str:
        span = f"{self.steps[0]}..{self.steps[-1]}" if self.steps else "none"
        return (f"<Trajectory {self.path!r}: {len(self.steps)} steps ({span}), "
                f"{len(self.names)} params, mode {self.mode}>")

    # ------------------------------------------------------------------ per-step metadata
    def losses(self) -> dict[int, float | None]:
        """Training loss reported with the update that produced each recorded step."""
        return {t: e.get("loss") for t, e in self._entries.items()}

    def train_losses(self) -> dict[int, float | None]:
        """Training loss of every step, unrecorded ones included (``every > 1``)."""
        out: dict[int, float | None] = {}
        prev = None
        for t in self.steps:
            e = self._entries[t]
            ls = e.get("interval_losses")
            if ls is not None and prev is not None and len(ls) == t - prev:
                out.update(zip(range(prev + 1, t + 1), ls))
            else:
                out[t] = e.get("loss")
            prev = t
        return out

    def skipped_steps(self) -> list[int]:
        """Steps whose update the optimizer skipped (θ unchanged, e.g. an AMP overflow), ascending;
        with ``every > 1`` unrecorded ones included."""
        out = set()
        for e in self.manifest["steps"]:
            out.update(e.get("interval_skipped", ()))
            if e.get("skipped"):
                out.add(e["step"])
        return sorted(out)

    def lrs(self) -> dict[int, list[float] | None]:
        """Learning rate per parameter group at each recorded step (None if not reported)."""
        return {t: e.get("lr") for t, e in self._entries.items()}

    def next_step(self, t: int) -> int | None:
        """The recorded step after ``t`` (which need not be recorded), or None at the end."""
        i = bisect.bisect_right(self.steps, t)
        return self.steps[i] if i < len(self.steps) else None

    def files(self) -> list[tuple[int, str, str]]:
        """(step, role, relative path) of every data file, in step order."""
        return [(t, role, rel) for t in self.steps
                for role, rel in self._entries[t]["files"].items()]

    def file_size(self, step: int, role: str) -> int:
        """Bytes of the ``role`` file of ``step``, as the manifest records them."""
        entry = self._entries[step]
        return entry["bytes"][entry["files"][role]]

    def nbytes(self) -> int:
        """Bytes on disk: manifest.json plus every data file it lists."""
        size = sum(self._entries[t]["bytes"][rel] for t, _, rel in self.files())
        return size + len(self._source.read(MANIFEST))

    # ------------------------------------------------------------------ reading files
    @property
    def _fix(self) -> str:
        # The relative file name leads the message; the remedy names the store itself.
        return f"re-record or restore the file; `lca verify {self.path}` lists all problems"

    def read_file(self, step: int, role: str) -> bytes:
        """Bytes of a listed data file, checked against the manifest's size and hash."""
        entry = self._entries[step]
        rel = entry["files"][role]
        try:
            data = self._source.read(rel)
        except FileNotFoundError:
            raise TrajectoryError(f"{rel}: file is missing; {self._fix}") from None
        except OSError as err:
            raise TrajectoryError(f"{rel}: cannot read ({err}); {self._fix}") from None
        if len(data) != entry["bytes"][rel]:
            raise TrajectoryError(f"{rel}: {len(data)} bytes, manifest says "
                                  f"{entry['bytes'][rel]} (truncated or replaced); {self._fix}")
        problem = digest_problem(entry, rel, data)      # with the hash the manifest names
        if problem is not None:
            raise TrajectoryError(f"{rel}: {problem}; {self._fix}")
        return data

    def load(self, step: int, role: str) -> Tensors:
        """Decoded and shape/dtype-checked tensors of one data file (``role``: keyframe, delta
        or state; a delta as per-parameter payload for :func:`~replay.store.codec.apply_delta`)."""
        return self._checked(step, role, self._tensors(step, role))

    def _tensors(self, step: int, role: str) -> Tensors:
        """One data file's tensors as stored, its size, hash and step checked."""
        data = self.read_file(step, role)
        rel = self._entries[step]["files"][role]
        try:
            tensors = safetensors.torch.load(data)
            meta = header_metadata(data)
        except Exception as err:  # safetensors raises its own error types
            raise TrajectoryError(
                f"{rel}: not a readable safetensors file ({err}); {self._fix}") from None
        if meta.get("step") not in (None, str(step)):
            raise TrajectoryError(f"{rel}: belongs to step {meta['step']}, not {step}; "
                                  f"{self._fix}")
        return tensors

    def _checked(self, step: int, role: str, tensors: Tensors) -> Tensors:
        """:meth:`load` from the file's tensors: shapes and dtypes checked, a delta cut per
        parameter."""
        if role == "delta":
            if self.format_version >= 2:      # one flat Δ per dtype group, cut per parameter
                tensors = self.layout.decode_delta(tensors)
            problem = (tensors if isinstance(tensors, str)
                       else check_delta_payload(tensors, self._param_shapes, self.dtypes))
        elif role == "keyframe":
            problem = check_tensors(tensors, self._param_shapes, self.dtypes, complete=True)
        else:
            problem = check_tensors(tensors, self._state_shapes, self.state_dtypes,
                                    complete="keyframe" in self._entries[step]["files"])
        if problem:
            raise TrajectoryError(f"{self._entries[step]['files'][role]}: {problem}; {self._fix}")
        return tensors

    def _state_at(self, t: int, state: Tensors | None) -> Tensors:
        """State at ``t``: in full at keyframes, else ``state`` overlaid with the changes."""
        if "state" not in self._entries[t]["files"]:
            return state if state is not None else {}
        changed = self.load(t, "state")
        return changed if state is None else {**state, **changed}

    # ------------------------------------------------------------------ reconstruction
    def _check_step(self, t: int) -> None:
        if t in self._entries:
            return
        if not self.steps:
            raise TrajectoryError(f"{self.path} holds no recorded step yet")
        i = bisect.bisect_left(self.steps, t)
        near = sorted({self.steps[j] for j in (i - 1, i) if 0 <= j < len(self.steps)})
        raise TrajectoryError(
            f"step {t} is not recorded in {self.path}; nearest recorded steps: "
            f"{', '.join(map(str, near))} (recorded: {len(self.steps)} steps "
            f"{self.steps[0]}..{self.steps[-1]}, every {self.every})")

    # θ is held as one flat buffer per dtype (``layout``), each step's in fresh buffers: what a
    # walk hands out stays valid, and a replay can take a buffer as its θ without a copy.
    def _advance(self, t: int, flats: Flats, state: Tensors) -> tuple[int, Flats, Tensors]:
        """From θ_t to the next recorded step, by the store's :class:`RebuildPlan`."""
        nxt = self.next_step(t)
        source = self.plan.params(nxt, t)
        if source.role == "keyframe":
            flats = self.layout.gather(self.load(nxt, "keyframe"))
        else:
            tensors = self._tensors(t, "delta")
            # Format 2 applied per dtype group when the file passes every check; otherwise
            # the per-parameter path, whose checks name what is wrong.
            parts = self.layout.flat_delta(tensors) if self.format_version >= 2 else None
            flats = self.layout.apply_flat(flats, parts) if parts is not None else \
                self.layout.apply_delta(flats, self._checked(t, "delta", tensors))
        return nxt, flats, self._state_at(nxt, state)

    def _start(self, t: int) -> tuple[int, Flats, Tensors]:
        """A reconstructed step ≤ t to walk from: the cached step if closer than the keyframe."""
        k = self.plan.start(t)
        if self._cache is not None and k <= self._cache[0] <= t:
            return self._cache
        return k, self.layout.gather(self.load(k, "keyframe")), self._state_at(k, None)

    def _walk(self, start: int, stop: int) -> Iterator[tuple[int, Flats, Tensors]]:
        t, flats, state = self._start(start)
        while True:
            self._cache = (t, flats, state)
            if t >= start:
                yield t, flats, state
            if t >= stop or self.next_step(t) is None:
                return
            t, flats, state = self._advance(t, flats, state)

    def _span(self, start: int | None, stop: int | None) -> tuple[int, int]:
        start = self.steps[0] if start is None else start
        stop = self.steps[-1] if stop is None else stop
        self._check_step(start)
        return start, stop

    def walk(self, start: int | None = None, stop: int | None = None
             ) -> Iterator[tuple[int, Tensors, Tensors]]:
        """Yield ``(t, params, state)`` for each recorded t in [start, stop], in order.

        Walks forward once from the nearest keyframe ≤ start, so each step costs one delta
        (O(1)). ``start``/``stop`` default to the first/last recorded step; a ``start`` that is
        not recorded raises TrajectoryError naming the nearest recorded steps.
        """
        if not self.steps:
            return
        for t, flats, state in self._walk(*self._span(start, stop)):
            yield t, _copy(self.layout.split(flats)), _copy(state)

    def walk_flat(self, start: int | None = None, stop: int | None = None
                  ) -> Iterator[tuple[int, Flats, Tensors]]:
        """:meth:`walk` yielding θ_t as ``layout``'s flat buffers (dtype -> (n,) tensor, the
        parameters of that dtype in manifest order) and the state, without copies: they are
        shared with the walk and the next walk's start, so callers must not modify them."""
        if not self.steps:
            return
        yield from self._walk(*self._span(start, stop))

    def params(self, t: int) -> Tensors:
        """θ_t: name -> CPU tensor (recorded shape and dtype), bit-exact."""
        self._check_step(t)
        for _, flats, _ in self._walk(t, t):
            return _copy(self.layout.split(flats))
        raise AssertionError("unreachable")

    def state(self, t: int) -> Tensors:
        """Frozen parameters and buffers at ``t`` (``{}`` if the model has none)."""
        self._check_step(t)
        for _, _, state in self._walk(t, t):
            return _copy(state)
        raise AssertionError("unreachable")

    def delta(self, t: int) -> Tensors:
        """θ_next − θ_t in float64 (next = the recorded step after t), per parameter."""
        nxt = self.next_step(t)
        self._check_step(t)
        if nxt is None:
            raise TrajectoryError(f"step {t} is the last recorded step of {self.path}: "
                                  "there is no update after it")
        start = self.params(t)
        end = self.params(nxt)
        return {n: end[n].to(torch.float64) - start[n].to(torch.float64) for n in self.names}

    # ------------------------------------------------------------------ verification
    def problems(self, first_only: bool = False) -> list[str]:
        """Everything wrong with the store, one line each ([] when it is sound).

        Reads every listed file once (size, sha256, decoding, shapes, dtypes) while walking
        each keyframe segment, and checks that the deltas into a keyframe rebuild it bit for bit.
        """
        from replay.store.verify import store_problems

        return store_problems(self, first_only=first_only)

    def verify(self) -> None:
        """Raise TrajectoryError naming the first bad file; return None if the store is sound."""
        found = self.problems(first_only=True)
        if found:
            raise TrajectoryError(found[0])


def _copy(tensors: Tensors) -> Tensors:
    # Callers own what they get: an in-place edit must not corrupt the next step of a walk.
    return {k: v.clone() for k, v in tensors.items()}
