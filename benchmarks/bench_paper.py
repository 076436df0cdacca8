"""What a ``lca paper`` config will cost on this machine, from its unit operations.

Measures, with the config's own sizes and thread count, the median CPU and wall seconds of: a
training update, a sampled replay evaluation (gradient + end-point loss on one mini-batch), an
exact evaluation of the simulation's subset, and greedy translation; then multiplies by the
config's counts into a per-stage estimate (the model written next to each line). Compare it
with DIR/stages.json of a real run: that run's wall times are the measurement, this is the
forecast used to size configs/paper.yaml and to price configs/paper-large.yaml. Usage::

    python benchmarks/bench_paper.py configs/paper.yaml [--repeat 5] [--workers 2]
        [--threads N] [--exact-sample N]

``--exact-sample N`` times the exact evaluation on N pairs of the simulation subset and scales
it to the whole subset (for configs whose subset is too large to evaluate here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def clocked(fn, repeat: int) -> tuple[float, float]:
    """(median wall s, median CPU s of this process) of ``repeat`` calls after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main() -> int:
    from replay.paper.settings import load_paper_config
    from replay.task import load_task

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="replay workers of the paper's replay (default: the cores)")
    ap.add_argument("--threads", type=int, help="torch threads (default: train.threads)")
    ap.add_argument("--exact-sample", type=int, metavar="N",
                    help="time the exact evaluation on N subset pairs and scale it up")
    a = ap.parse_args()
    cfg = load_paper_config(a.config)
    threads = a.threads or cfg.train.threads
    torch.set_num_threads(threads)
    args = {**cfg.task.args, "tokenizer": None}
    t0 = time.perf_counter()
    task = load_task(cfg.task.ref, args)
    build = time.perf_counter() - t0
    sim_task = load_task(cfg.task.ref, {**args, **cfg.simulation.task_args})
    model = task.build_model()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = task.training_batches(cfg.train.batch_size, 0)
    sim_batches = sim_task.training_batches(cfg.simulation.batch_size, 0)
    rng = np.random.default_rng(0)

    def update(source=batches):
        model.train()
        loss, n = task.loss(model, next(source))
        opt.zero_grad()
        (loss / n).backward()
        opt.step()

    def evaluation(items, size):
        """Gradient at the start point, loss at the end point, over ``items`` in batches."""
        model.eval()
        for i in range(0, len(items), size):
            batch = task.collate(items[i:i + size])
            loss, n = task.loss(model, batch)
            (loss / n).backward()
            with torch.no_grad():
                task.loss(model, batch)
        model.zero_grad()

    train_items = task.datasets()["train"]
    b = cfg.replay.batch_size

    def sampled():  # the engine pools a sample into length-sorted batches of eval_batch_size
        idx = rng.choice(len(train_items), size=b, replace=False)
        evaluation(sorted((train_items[i] for i in idx), key=task.item_size),
                   task.eval_batch_size)

    full_subset = sim_task.datasets()["train"]
    subset = full_subset[:a.exact_sample] if a.exact_sample else full_subset
    exact_scale = len(full_subset) / len(subset)
    eval_size = cfg.simulation.eval_batch_size or task.eval_batch_size
    test = task.datasets()["test"][:64]

    units = {
        "update": clocked(update, a.repeat),
        "sim_update": clocked(lambda: update(sim_batches), a.repeat),
        "sampled_eval": clocked(sampled, a.repeat),
        "exact_eval": tuple(x * exact_scale for x in clocked(
            lambda: evaluation(sorted(subset, key=task.item_size), eval_size),
            max(1, a.repeat // 2))),
        "translate_64": clocked(lambda: task.translate(model, "test", len(test)), 1),
    }
    n_test = cfg.analysis.bleu_sentences or len(task.datasets()["test"])
    steps, sim = cfg.train.steps, cfg.simulation
    datasets = len(cfg.replay.datasets or ["train", "test"])
    # Each line: stage -> (count, unit, divisor): seconds = count * unit seconds / divisor.
    plan = {
        "train": (steps, "update", 1),
        "bleu": (n_test / 64, "translate_64", 1),
        "paper_replay": (steps * datasets, "sampled_eval", a.workers),
        "simulation_train": (sim.steps, "sim_update", 1),
        "simulation_exact": (sim.steps, "exact_eval", 1),
        "simulation_sampled": (sim.steps, "sampled_eval", 1),
        # Simpson reuses the end point: >= 2 gradient evaluations per update (adaptive: more)
        f"simulation_{sim.quadrature}_at_least": (2 * sim.steps, "exact_eval", 1),
    }
    print(f"{a.config}: {n_params:,} parameters; task built in {build:.1f} s; "
          f"{threads} training thread(s), {a.workers} replay worker(s)")
    print(f"{'unit':<16}{'wall s':>10}{'cpu s':>10}")
    for name, (wall, cpu) in units.items():
        print(f"{name:<16}{wall:>10.3f}{cpu:>10.3f}")
    est = {}
    print(f"\n{'stage':<34}{'count':>10}{'x unit':>14}{'est. s (cpu)':>14}")
    for stage, (count, unit, div) in plan.items():
        est[stage] = count * units[unit][1] / div
        print(f"{stage:<34}{count:>10.0f}{unit:>14}{est[stage]:>14.0f}")
    sim_total = sum(v for k, v in est.items() if k.startswith("simulation"))
    main_line = est["train"] + est["bleu"]
    total = (max(main_line, sim_total) if sim.alongside else main_line + sim_total) \
        + est["paper_replay"]
    print(f"\nestimated total without set-up, task builds and reports: {total:.0f} s "
          f"({'simulation alongside' if sim.alongside else 'sequential'})")
    print("RESULT " + json.dumps({"bench": "paper", "config": a.config, "params": n_params,
                                  "units": {k: {"wall": w, "cpu": c} for k, (w, c) in units.items()},
                                  "estimate_s": est, "total_s": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
