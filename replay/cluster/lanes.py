"""How a Dask replay hands its pieces to the task slots (docs/design.md §8).

The pieces are dealt into one contiguous *lane* per task slot, each lane pinned loosely to its
slot's worker, so that a worker gets the piece starting where its previous one ended and reuses
its end gradient (``runtime.Carry``); a lost worker's pieces still run elsewhere. Every Dask task
costs milliseconds of scheduling and messages between client, scheduler and worker, as much as
a fast model's piece, so once a lane's speed is known its next pieces go as one task of about
:data:`TASK_SECONDS` of compute, walked as one run (``piece.compute_pieces``) and returned
piece by piece. Each lane keeps :data:`IN_FLIGHT` tasks submitted, so that its worker never
waits for the next one. Only placement and grouping change; results do not depend on them.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator

# Compute per task once a lane's rate is known: short enough for the progress bar and for what
# a lost worker takes with it, long enough that the per-task cost of Dask is small beside it.
TASK_SECONDS = 1.0
IN_FLIGHT = 2

Piece = tuple[int, int]


def split_lanes(pieces: list[Piece], slots: int) -> list[list[Piece]]:
    """``pieces`` cut into ``slots`` contiguous lanes of near-equal length (fewer when there
    are fewer pieces)."""
    slots = max(1, min(slots, len(pieces)))
    bounds = [round(k * len(pieces) / slots) for k in range(slots + 1)]
    return [pieces[a:b] for a, b in zip(bounds, bounds[1:])]


def take_group(lane: deque, rate: float | None) -> list[Piece]:
    """The lane's next task: one piece while its rate (seconds of compute per step) is unknown,
    else as many pieces as fit in :data:`TASK_SECONDS` (at least one)."""
    group = [lane.popleft()]
    if rate is None:
        return group
    budget = TASK_SECONDS / max(rate, 1e-9) - (group[0][1] - group[0][0])
    while lane and lane[0][1] - lane[0][0] <= budget:
        budget -= lane[0][1] - lane[0][0]
        group.append(lane.popleft())
    return group


def run_lanes(client, task: Callable, args: tuple, pieces: list[Piece],
              slots: list[str], unpack: Callable) -> Iterator[dict]:
    """Run ``task(*args, group)`` over ``pieces`` on ``slots`` (worker addresses, one per task
    slot); yields the pieces' results as tasks complete, ``unpack`` making the list of a
    group's results from what its task returned."""
    from distributed import as_completed

    lanes = [deque(lane) for lane in split_lanes(pieces, len(slots))]
    rates: list[float | None] = [None] * len(lanes)
    order = itertools.count()
    lane_of: dict = {}
    done = as_completed()

    def submit(k: int) -> None:
        if not lanes[k]:
            return
        # Explicit priorities keep each lane in order: tasks submitted within Dask's
        # fifo_timeout share one, and a worker then runs them in no particular order.
        future = client.submit(task, *args, take_group(lanes[k], rates[k]), pure=False,
                               workers=[slots[k]], allow_other_workers=True,
                               priority=-next(order))
        lane_of[future] = k
        done.add(future)

    for _ in range(IN_FLIGHT):  # round-robin: a worker of several slots starts every lane
        for k in range(len(lanes)):
            submit(k)
    try:
        for future in done:
            results = unpack(future.result())
            k = lane_of.pop(future)
            steps = sum(r["i1"] - r["i0"] for r in results)
            rates[k] = sum(r["seconds"] for r in results) / max(steps, 1)
            submit(k)
            yield from results
    finally:
        for future in lane_of:
            future.cancel()
