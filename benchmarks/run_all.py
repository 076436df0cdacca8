"""Run every benchmark and print one table of the ratios they measured (``make bench``).

Each benchmark runs in its own process (its thread settings and memory stay its own), in one
shared work directory so the demo trajectories are recorded once. Every benchmark prints its
own report and a last ``RESULT {json}`` line; this script collects those lines into the table.
Targets are checked and shown, never enforced: the exit status is 0 unless a benchmark fails.
Usage::

    python benchmarks/run_all.py [--quick] [--only replay,naive,...] [--work DIR]
                                 [--markdown FILE]

``--quick`` runs every benchmark on less work; the default is what the README's Measurements
section reports (the big-model benchmark alone takes several minutes on 2 cores: its
54.6 M-parameter replay and memory runs dominate; ``--only`` picks a subset).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

BENCHES = {
    "kernel": "bench_kernel.py",     # 3. numba reduction vs torch, vs memory copy
    "record": "bench_record.py",     # 4. recording overhead per training step
    "replay": "bench_replay.py",     # 1. replay efficiency vs the plain-loop bound
    "naive": "bench_naive.py",       # 2. vs the replay script a user would write
    "scaling": "bench_scaling.py",   # 5. Dask: 2 workers vs 1, cost model
    "storage": "bench_storage.py",   # 6. bytes per parameter per step, memory per worker
    "sampled": "bench_sampled.py",   # 7. sampled vs exact: cost and Kendall's tau
    "fast": "bench_fast.py",         # 8. replay efficiency on a fast model (sync, local)
    "paper-cost": "bench_paper_cost.py",  # 9. sampled first-order replay vs a training step
    "cold-ops": "bench_cold_ops.py",  # 9b. small operations right after a model's passes
    "big": "bench_big.py",           # 10. a 54.6 M-parameter model: writer, recording, replay
}


def run_one(name: str, work: str, quick: bool) -> tuple[dict | None, float]:
    cmd = [sys.executable, os.path.join(HERE, BENCHES[name]), "--work", work]
    if quick:
        cmd.append("--quick")
    elif name == "kernel":
        cmd += ["--repeats", "3"]  # 1e8 elements: the slow torch pipelines dominate the time
    print(f"\n=== {name}: {' '.join(os.path.relpath(c) if c.endswith('.py') else c for c in cmd[1:])}",
          flush=True)
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif line.strip():
            print("  " + line.rstrip(), flush=True)
    proc.wait()
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        print(f"  !! {name} exited with status {proc.returncode}", flush=True)
    return result, seconds


def table(results: dict[str, dict], markdown: bool) -> str:
    rows = [("benchmark", "measure", "value", "target", "met", "notes")]
    for name, res in results.items():
        for r in res["rows"]:
            met = {True: "yes", False: "NO", None: "-"}[r["ok"]]
            rows.append((name, r["metric"], r["shown"], r["target"] or "-", met, r["note"]))
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    out = []
    for k, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5])
        if k == 0:
            out.append("-" * (sum(widths) + 2 * 5 + 5))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="less work per benchmark")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--work", default=None, help="work directory (default: a temporary one, "
                                                "removed afterwards)")
    p.add_argument("--markdown", default=None, help="also write the table as Markdown here")
    args = p.parse_args(argv)
    names = list(BENCHES) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; valid: {', '.join(BENCHES)}")
    work = args.work or tempfile.mkdtemp(prefix="lca-bench-")
    os.makedirs(work, exist_ok=True)
    print(f"machine: {common.machine()}")
    print(f"mode: {'quick' if args.quick else 'full'}; work directory {work}", flush=True)
    began = time.perf_counter()
    results, failed, seconds = {}, [], {}
    try:
        for name in names:
            res, seconds[name] = run_one(name, work, args.quick)
            if res is None:
                failed.append(name)
            else:
                results[name] = res
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - began
    print("\n" + "=" * 100)
    print(f"lca-replay benchmarks ({'quick' if args.quick else 'full'}), one run, "
          f"{total / 60:.1f} min; medians of interleaved repeats")
    print(f"machine: {common.machine()}")
    print(table(results, markdown=False))
    met = [r["ok"] for res in results.values() for r in res["rows"] if r["ok"] is not None]
    print(f"targets met: {sum(met)} of {len(met)}"
          + (f"; failed to run: {', '.join(failed)}" if failed else ""))
    print("seconds per benchmark: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Measured {time.strftime('%Y-%m-%d')} ({'quick' if args.quick else 'full'} "
                    f"mode, {total / 60:.1f} min) on: {common.machine()}\n\n")
            f.write(table(results, markdown=True) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
