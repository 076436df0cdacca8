"""Whole-store integrity check behind ``Trajectory.verify`` and ``lca verify``.

One pass over the store, keyframe segment by keyframe segment: every listed file is read once
and checked (size, sha256, safetensors decoding, names/shapes/dtypes), the deltas of a segment
are applied from its keyframe, and where the recorder also stored the delta *into* the next
keyframe, the walked θ must equal that keyframe bit for bit. That closes the loop on
the codec itself, not only on the bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from replay.store.codec import apply_delta, bits, same_bits
from replay.errors import TrajectoryError
from replay.store.manifest import MANIFEST

if TYPE_CHECKING:
    from replay.store.trajectory import Trajectory


class _Stop(Exception):
    """Raised internally to stop at the first problem."""


def store_problems(traj: Trajectory, first_only: bool = False) -> list[str]:
    """One line per problem found (first the file, then what is wrong); [] for a sound store."""
    found: list[str] = []

    def bad(msg: str) -> None:
        found.append(msg)
        if first_only:
            raise _Stop

    def load(step: int, role: str):
        try:
            return traj._load(step, role)
        except TrajectoryError as err:
            bad(str(err))
            return None

    try:
        _walk_segments(traj, load, bad)
    except _Stop:
        pass
    return found


def _walk_segments(traj: Trajectory, load, bad) -> None:
    steps, entries = traj.steps, traj._entries
    params = None          # walked θ; None once a file on the way is bad
    for i, t in enumerate(steps):
        files = entries[t]["files"]
        prev = steps[i - 1] if i else None
        if "keyframe" in files:
            key = load(t, "keyframe")
            # Walked θ arrives here through the delta into this keyframe: compare. (State has
            # no delta into a keyframe: it is stored there in full.)
            if prev is not None and "delta" in entries[prev]["files"] and params is not None \
                    and key is not None:
                _compare(traj, files["keyframe"], t, params, key, bad)
            params = key
        elif "delta" not in entries[prev]["files"]:
            bad(f"{traj.path}/{MANIFEST}: step {t} has no keyframe and step {prev} no delta "
                "file, so it cannot be rebuilt; re-record the trajectory")
            params = None
        if "state" in files:
            load(t, "state")       # decoded and checked against the state specs
        if "delta" in files:
            payload = load(t, "delta")
            params = None if payload is None or params is None else apply_delta(params, payload)


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


def rebuilt_keyframes(traj: Trajectory) -> int:
    """How many keyframes a sound store's check rebuilds from deltas (those with a delta in)."""
    steps = traj.steps
    return sum(1 for i, t in enumerate(steps[1:], 1)
               if t in traj.keyframe_steps and "delta" in traj._entries[steps[i - 1]]["files"])
