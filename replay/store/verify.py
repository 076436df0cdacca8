"""Whole-store integrity check behind ``Trajectory.verify`` and ``lca verify``.

One pass over the store, keyframe segment by keyframe segment: every listed file is read once
and checked (size, sha256, safetensors decoding, names/shapes/dtypes), the deltas of a segment
are applied from its keyframe, and where the recorder also stored the delta *into* the next
keyframe, the walked θ must equal that keyframe bit for bit. That closes the loop on
the codec itself, not only on the bytes.
"""

from __future__ import annotations

from replay.errors import TrajectoryError
from replay.store.codec import apply_delta, bits, same_bits


class _Stop(Exception):
    """Raised internally to stop at the first problem."""


def store_problems(traj, first_only: bool = False) -> list[str]:
    """One line per problem found (first the file, then what is wrong); [] for a sound store.

    ``traj``: a :class:`~replay.store.trajectory.Trajectory` (not imported here: the
    trajectory imports this module)."""
    found: list[str] = []

    def bad(msg: str) -> None:
        found.append(msg)
        if first_only:
            raise _Stop

    def load(step: int, role: str):
        try:
            return traj.load(step, role)
        except TrajectoryError as err:
            bad(str(err))
            return None

    try:
        _walk_segments(traj, load, bad)
    except _Stop:
        pass
    return found


def _walk_segments(traj, load, bad) -> None:
    plan = traj.plan
    params = None          # walked θ; None once a file on the way is bad
    prev = None
    for t in traj.steps:
        files = plan.files[t]
        try:
            source = plan.params(t, prev)
        except TrajectoryError as err:
            bad(str(err))
            source, params = None, None
        if source is not None and source.role == "keyframe":
            key = load(t, "keyframe")
            # Walked θ arrives here through the delta into this keyframe: compare. (State has
            # no delta into a keyframe: it is stored there in full.)
            if prev is not None and "delta" in plan.files[prev] and params is not None \
                    and key is not None:
                _compare(traj, files["keyframe"], t, params, key, bad)
            params = key
        if "state" in files:
            load(t, "state")       # decoded and checked against the state specs
        if "delta" in files:
            payload = load(t, "delta")
            params = None if payload is None or params is None else apply_delta(params, payload)
        prev = t


def _compare(traj, rel, t, walked, stored, bad) -> None:
    """Report the first tensor where the walked value differs from the stored keyframe."""
    start = max(k for k in traj.keyframe_steps if k < t)
    for name in stored:
        if name not in walked or not same_bits(walked[name], stored[name]):
            n = int((bits(walked[name]) != bits(stored[name])).sum()) if name in walked and \
                walked[name].shape == stored[name].shape else -1
            diff = f"{n} element(s) differ" if n >= 0 else "shapes differ"
            bad(f"{rel}: walking the deltas from keyframe {start} does not rebuild step {t} "
                f"bit for bit ({name!r}: {diff}); the recording is inconsistent: re-record it")
            return


def rebuilt_keyframes(traj) -> int:
    """How many keyframes a sound store's check rebuilds from deltas (those with a delta in)."""
    plan = traj.plan
    return sum(1 for prev, t in zip(plan.steps, plan.steps[1:])
               if t in plan.keyframes and "delta" in plan.files[prev])
