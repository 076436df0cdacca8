"""Shared pieces of the benchmarks: the demo trajectory, interleaved timing, result lines.

Every benchmark is a script that prints a human-readable report and, last, one line
``RESULT {json}`` that ``run_all.py`` collects into the table. Timings are medians of
interleaved repeats (A, B, A, B, …) so that both sides of a ratio see the same machine load;
an efficiency is the median of the rounds' own ratios (:func:`paired`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dask's INFO chatter (and the tracebacks it logs while closing clusters) is not ours to show;
# distributed sets its loggers' levels when imported, so import it first.
import distributed  # noqa: E402,F401

logging.getLogger("distributed").setLevel(logging.CRITICAL)

DEMO_CONFIG = os.path.join(ROOT, "configs", "demo.yaml")
TASK = "replay.tasks.toy_nmt:ToyNMT"


def demo_config(steps: int):
    """configs/demo.yaml with ``steps`` training updates."""
    from replay.config import load_config

    cfg = load_config(DEMO_CONFIG)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def demo_task(cfg=None):
    from replay.task import load_task

    cfg = cfg or demo_config(1)
    return load_task(cfg.task.ref, cfg.task.args)


def record_demo(path: str, steps: int) -> str:
    """Train the demo model for ``steps`` updates, recording every step into ``path``."""
    from replay.commands.train import train

    if not os.path.exists(os.path.join(path, "manifest.json")):
        train(demo_config(steps), path, log=lambda _: None)
    return path


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def interleave(cases: dict[str, Callable[[], object]], repeats: int,
               warmup: dict[str, Callable[[], object]] | None = None,
               before: dict[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """Run every case once per round, rotating the order each round; seconds per case.

    ``warmup``: callables run once first (e.g. the same work on one step), so one-time costs
    (imports, JIT caches, allocator growth) do not land in the first round. ``before``: per
    case, a callable run untimed before each of its runs (e.g. removing the previous output).
    """
    names = list(cases)
    for fn in (warmup or {}).values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if before and name in before:
                before[name]()
            times[name].append(timed(cases[name])[0])
    return times


def removal(path: str) -> Callable[[], None]:
    """A callable that removes ``path`` (a replay's cube), for :func:`interleave`'s ``before``:
    the previous run's output is not the next run's work, and the plain loop a replay is
    compared with removes nothing either."""
    return lambda: shutil.rmtree(path, ignore_errors=True)


def paired(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``times[num][r] / times[den][r]``: the ratio of two cases timed in
    the same round of :func:`interleave`. This machine's speed drifts over seconds (the same
    work's run times correlate from one run to the next), so a ratio within a round cancels
    the drift that a ratio of two medians keeps."""
    return median([a / b for a, b in zip(times[num], times[den])])


def median(xs) -> float:
    return float(statistics.median(xs))


def machine() -> str:
    """One line: CPU model, logical cores, load, memory, library versions."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = "load %.1f" % os.getloadavg()[0]
    except OSError:
        load = "load ?"
    mem = ""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages * size / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    import numba
    import numpy

    return (f"{model}, {os.cpu_count()} logical cores{mem}, {load}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
            f"numba {numba.__version__}")


def emit(name: str, rows: list[dict], **extra) -> None:
    """The machine-readable last line: ``RESULT {"bench": name, "rows": [...]}``.

    Each row: ``{"metric", "value", "target" (text or None), "ok" (bool or None), "note"}``.
    """
    print("RESULT " + json.dumps({"bench": name, "rows": rows, **extra}), flush=True)


def row(metric: str, value: float, target: str | None = None, ok: bool | None = None,
        note: str = "", fmt: str = "{:.2f}") -> dict:
    return {"metric": metric, "value": value, "shown": fmt.format(value), "target": target,
            "ok": ok, "note": note}


def log(*args) -> None:
    print(*args, file=sys.stdout, flush=True)
