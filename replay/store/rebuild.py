"""How θ_t is rebuilt at a recorded step: the one rule every reader of a store follows.

A walk starts at a keyframe and goes forward one recorded step at a time. Arriving at step t
from the step before it (``prev``), θ_t is t's own keyframe if t has one, else θ_prev with
``prev``'s delta applied; t's state is the state so far overlaid with t's state file, if t has
one (keyframes hold the state in full). Reading (:class:`~replay.store.trajectory.Trajectory`),
a replay's pre-flight check of the files it will read (:mod:`replay.engine.preflight`) and
``lca verify`` (:mod:`replay.store.verify`) all take their file lists from a
:class:`RebuildPlan`, so the three cannot disagree.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from replay.errors import TrajectoryError
from replay.store.manifest import MANIFEST


@dataclass(frozen=True)
class Read:
    """One data file a walk reads: the file of ``role`` (keyframe, delta, state) of ``step``."""

    step: int
    role: str


class RebuildPlan:
    """The files that rebuild each recorded step of a store.

    ``steps``: recorded steps, ascending; ``files``: step -> {role: relative path} as in the
    manifest; ``where``: the store, for messages.
    """

    def __init__(self, steps: Sequence[int], files: Mapping[int, Mapping[str, str]], where: str):
        self.steps, self.files, self.where = list(steps), files, where
        self.keyframes = [t for t in self.steps if "keyframe" in files[t]]

    def start(self, t: int) -> int:
        """The keyframe a walk to ``t`` starts from (the manifest guarantees one at step 0)."""
        return self.keyframes[bisect.bisect_right(self.keyframes, t) - 1]

    def previous(self, t: int) -> int | None:
        """The recorded step before ``t``, or None for the first."""
        i = bisect.bisect_left(self.steps, t)
        return self.steps[i - 1] if i > 0 else None

    def params(self, t: int, prev: int | None) -> Read:
        """Where θ_t comes from when a walk arrives from ``prev`` (None: the walk starts at t,
        which must then be a keyframe). TrajectoryError when neither file exists."""
        if prev is None or "keyframe" in self.files[t]:
            return Read(t, "keyframe")
        if "delta" in self.files[prev]:
            return Read(prev, "delta")
        raise TrajectoryError(f"{self.where}/{MANIFEST}: step {t} has no keyframe and step "
                              f"{prev} no delta file, so step {t} cannot be rebuilt; re-record "
                              "the trajectory")

    def reads(self, t: int, prev: int | None) -> list[Read]:
        """Every file read to arrive at step ``t`` from ``prev``: θ's source, then t's state."""
        out = [self.params(t, prev)]
        if "state" in self.files[t]:
            out.append(Read(t, "state"))
        return out

    def walk(self, first: int, last: int) -> Iterator[tuple[int, int | None, list[Read]]]:
        """``(t, prev, reads)`` for each recorded step from the keyframe before ``first`` to
        ``last``; ``prev`` is None at the start of the walk."""
        prev = None
        for t in self.steps[bisect.bisect_left(self.steps, self.start(first)):]:
            if t > last:
                return
            yield t, prev, self.reads(t, prev)
            prev = t
