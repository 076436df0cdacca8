"""The stages of ``lca paper``; each reuses what an earlier run under the same DIR finished.

Layout of DIR::

    tokenizer.json             the BPE, trained on the train split (stage 1)
    trajectory/                the recorded main run (stage 2)
    bleu.json                  greedy BLEU on test and the copy baseline (stage 3)
    lca-paper.zarr             the paper's replay: sampled, first-order, train + test (stage 4)
    simulation/trajectory/     §3.2: a model trained on a small subset (stage 5)
    simulation/lca-exact.zarr        exact gradients, first-order
    simulation/lca-sampled.zarr      sampled gradients, first-order
    simulation/lca-exact-<quadrature>.zarr   exact gradients, Simpson / adaptive
    findings.json, stages.json, report/, report-simulation/   (stage 6, always rewritten)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import sys
import time

from replay.errors import ConfigError, LCAError
from replay.paper.output import Log, write_json
from replay.paper.settings import PaperConfig, PaperTrain
from replay.paper.training import final_model, train_recorded
from replay.settings import ReplaySettings
from replay.task import load_task, recorded_args


class Stages:
    """Per-stage wall times, kept in DIR/stages.json across resumed runs (a reused stage keeps
    the seconds of the run that did it)."""

    def __init__(self, out: str, log: Log):
        self.path, self.log = os.path.join(out, "stages.json"), log
        self.data = {}
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.data = json.load(f).get("stages", {})
        self.began = time.perf_counter()

    def done(self, name: str, began: float, reused: bool, seconds: float | None = None,
             **facts) -> None:
        if reused and name in self.data:
            self.data[name]["reused"] = True
        else:
            took = time.perf_counter() - began if seconds is None else seconds
            self.data[name] = {"seconds": round(took, 1), "reused": reused, **facts}
        self.save()

    def save(self, **extra) -> None:
        write_json(self.path, {"stages": self.data, **extra})


def run_paper(config: PaperConfig, out: str, scheduler: str | None, log: Log) -> dict:
    """All stages; returns the findings (also in DIR/findings.json).

    With ``simulation.alongside`` the §3.2 simulation (one core, in-process replays) runs in a
    second process while the main model trains and is scored on the other core.
    """
    import torch

    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(config.train.threads)
    stages = Stages(out, log)
    ref = config.task.ref

    t = time.perf_counter()
    args = dict(config.task.args)
    if args.get("tokenizer") is None:  # stored with the run, so replays load it
        args["tokenizer"] = os.path.join(out, "tokenizer.json")
    reused = os.path.exists(args["tokenizer"])
    log(f"[1/6] corpus and tokenizer ({'reusing' if reused else 'training'} {args['tokenizer']})")
    task = load_task(ref, args)
    if hasattr(task, "stats"):
        log(f"      {task.stats.describe()}")
    sizes = {name: len(items) for name, items in task.datasets().items()}
    log(f"      splits: {sizes}; vocabulary {getattr(task, 'vocab_size', '?')}")
    main_args = recorded_args(task, args)
    stages.done("corpus_tokenizer", t, reused, pairs=sizes)

    with contextlib.ExitStack() as stack:
        sim_future = None
        if config.simulation.alongside:
            sim_future = stack.enter_context(Alongside(_simulation_alongside, config, out, ref,
                                                       main_args))
            log("[5/6] simulation: started alongside, in a second process (lines tagged [sim])")

        t = time.perf_counter()
        store = os.path.join(out, "trajectory")
        reused = _reuse_trajectory(store, ref, main_args, config.train.steps, out, log, "[2/6]")
        if not reused:
            log(f"[2/6] training with recording into {store}")
            facts = train_recorded(task, ref, args, config.train, store,
                                   config.record.keyframe_every, log)
        stages.done("train", t, reused, **({} if reused else facts))

        t = time.perf_counter()
        bleu = _bleu(task, store, config, out, log)
        stages.done("bleu", t, bleu.pop("reused"))

        if sim_future is not None:
            t = time.perf_counter()
            log("      waiting for the simulation to finish")
            sim, parts = sim_future.result()
            reused = parts.pop("reused")
            stages.done("simulation_alongside", t, reused, seconds=sum(parts.values()), **parts)
            stages.done("wait_for_simulation", t, False)

        t = time.perf_counter()
        cube = os.path.join(out, "lca-paper.zarr")
        settings = replay_settings(config, scheduler)
        log(f"[4/6] the paper's replay ({describe(settings)}) on "
            f"{', '.join(settings.datasets)} -> {cube}")
        reused = _cube_done(cube)
        _replay(store, ref, cube, settings)
        stages.done("paper_replay", t, reused)

    if sim_future is None:
        t = time.perf_counter()
        sim, parts = simulation(config, out, ref, main_args, scheduler, log)
        reused = parts.pop("reused")
        stages.done("simulation", t, reused, **parts)

    t = time.perf_counter()
    log("[6/6] findings and reports")
    from replay.paper.findings import write_findings

    findings = write_findings(config, out, task, sizes, bleu, cube, sim, log)
    stages.done("findings_report", t, False)
    stages.save(total_seconds_this_run=round(time.perf_counter() - stages.began, 1))
    return findings


class Alongside:
    """``target(*args)`` in a spawned child process; :meth:`result` waits for its return value
    or re-raises its exception. Leaving the ``with`` block early (an error here) stops it."""

    def __init__(self, target, *args):
        ctx = multiprocessing.get_context("spawn")
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=(send, target, args), daemon=True)

    def __enter__(self) -> Alongside:
        self._proc.start()
        return self

    def result(self):
        try:
            ok, value = self._recv.recv()
        except EOFError:
            raise LCAError(f"the simulation process died (exit code {self._proc.exitcode}); "
                           "run lca paper again: finished stages are kept") from None
        self._proc.join()
        if not ok:
            raise value
        return value

    def __exit__(self, *exc) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join()


def _child(send, target, args) -> None:
    try:
        send.send((True, target(*args)))
    except BaseException as err:  # handed to the parent, which raises it
        send.send((False, err if isinstance(err, LCAError) else LCAError(
            f"the simulation failed: {type(err).__name__}: {err}")))


def _simulation_alongside(config: PaperConfig, out: str, ref: str,
                          main_args: dict) -> tuple[dict[str, str], dict[str, float]]:
    """:func:`simulation` in a child process, with in-process replays (one core)."""
    import torch

    torch.set_num_threads(config.train.threads)

    def log(text: str) -> None:
        print(f"[sim] {text.strip()}", file=sys.stderr, flush=True)

    return simulation(config, out, ref, main_args, "sync", log, progress=False)


def simulation(config: PaperConfig, out: str, ref: str, main_args: dict,
               scheduler: str | None, log: Log,
               progress: bool = True) -> tuple[dict[str, str], dict[str, float]]:
    """§3.2: train on the subset, replay it exactly (first-order and the better quadrature)
    and sampled (first-order). Returns ({"exact", "sampled", "quadrature"}: cube paths,
    {part: seconds})."""
    sc = config.simulation
    parts, t = {}, time.perf_counter()
    args = {**main_args, **sc.task_args}
    task = load_task(ref, args)
    sim_args = recorded_args(task, args)
    folder = os.path.join(out, "simulation")
    store = os.path.join(folder, "trajectory")
    n = {name: len(items) for name, items in task.datasets().items()}
    reused = _reuse_trajectory(store, ref, sim_args, sc.steps, out, log, "[5/6]")
    if not reused:
        log(f"[5/6] simulation: training on {n.get('train')} train pairs into {store}")
        cfg = PaperTrain(steps=sc.steps, batch_size=sc.batch_size,
                         lr=sc.lr if sc.lr is not None else config.train.lr,
                         warmup=sc.warmup if sc.warmup is not None else config.train.warmup,
                         betas=config.train.betas, weight_decay=config.train.weight_decay,
                         clip_norm=config.train.clip_norm, seed=config.train.seed,
                         log_every=max(1, sc.steps // 4))
        train_recorded(task, ref, args, cfg, store, config.record.keyframe_every, log)
    parts["train_seconds"] = round(time.perf_counter() - t, 1)
    base = dataclasses.replace(replay_settings(config, scheduler), datasets=("train",),
                               eval_batch_size=sc.eval_batch_size, progress=progress)
    cubes = {"exact": os.path.join(folder, "lca-exact.zarr"),
             "sampled": os.path.join(folder, "lca-sampled.zarr"),
             "quadrature": os.path.join(folder, f"lca-exact-{sc.quadrature}.zarr")}
    runs = {"exact": dataclasses.replace(base, gradient="exact", quadrature="first-order"),
            "sampled": dataclasses.replace(base, quadrature="first-order"),
            "quadrature": dataclasses.replace(base, gradient="exact", quadrature=sc.quadrature,
                                              tolerance=sc.tolerance, max_splits=sc.max_splits)}
    reused = reused and all(_cube_done(c) for c in cubes.values())
    for key in ("exact", "sampled", "quadrature"):
        t = time.perf_counter()
        log(f"      simulation replay: {describe(runs[key])} -> {cubes[key]}")
        _replay(store, ref, cubes[key], runs[key])
        parts[f"replay_{key}_seconds"] = round(time.perf_counter() - t, 1)
        log(f"      ... done in {parts[f'replay_{key}_seconds']:.0f} s")
    return cubes, {**parts, "reused": reused}


def _cube_done(path: str) -> bool:
    """Whether the cube at ``path`` exists with every step done (the replay will be a no-op)."""
    if not os.path.exists(path):
        return False
    import xarray as xr

    return bool(xr.open_zarr(path, chunks=None)["done"].values.all())


def replay_settings(config: PaperConfig, scheduler: str | None) -> ReplaySettings:
    """The paper replay's settings: the config's ``replay`` section, on train and test unless
    it names datasets, on ``scheduler`` when one is given."""
    rc = config.replay
    return dataclasses.replace(rc, datasets=rc.datasets or ("train", "test"),
                               scheduler=scheduler or rc.scheduler)


def describe(settings: ReplaySettings) -> str:
    mode = settings.mode
    grad = "exact gradients" if mode is None else \
        f"{mode.batches} fresh mini-batch(es) of {mode.batch_size} per update"
    return f"{grad}, {settings.quadrature}"


def _replay(store: str, ref: str, cube: str, settings: ReplaySettings) -> None:
    from replay import run

    # task=ref without task_args: the arguments recorded in the trajectory rebuild the task
    # (fingerprint and tokenizer checked), as any later `lca replay` would.
    run(store, task=ref, settings=dataclasses.replace(settings, cube=cube))


def _reuse_trajectory(store: str, ref: str, args: dict, steps: int, out: str, log: Log,
                      tag: str) -> bool:
    """True if ``store`` holds the finished run of these settings; ConfigError if it holds
    another or an unfinished one (DIR is then left as it is)."""
    from replay import open_trajectory

    if not os.path.exists(os.path.join(store, "manifest.json")):
        if os.path.exists(store):
            raise ConfigError(f"{store} exists but holds no trajectory (an interrupted start); "
                              f"delete it and run lca paper again")
        return False
    traj = open_trajectory(store)
    if traj.task != ref or traj.task_args != args:
        changed = sorted(k for k in set(args) | set(traj.task_args or {})
                         if (traj.task_args or {}).get(k) != args.get(k))
        raise ConfigError(f"{store} was recorded with other task settings (differing: "
                          f"{', '.join(changed) or 'task reference'}); use another --out DIR "
                          f"or delete {out} to start over")
    if traj.steps[-1] < steps:
        raise ConfigError(f"{store} holds an unfinished run (last step {traj.steps[-1]} of "
                          f"{steps}); delete {store} and run lca paper again")
    if traj.steps[-1] > steps:
        raise ConfigError(f"{store} holds {traj.steps[-1]} updates, the config asks for {steps}; "
                          f"use another --out DIR or delete {out} to start over")
    log(f"{tag} reusing {store} ({len(traj.steps)} recorded steps)")
    return True


def _bleu(task, store: str, config: PaperConfig, out: str, log: Log) -> dict:
    """{"test", "copy_baseline", "signature", "examples", "reused"}, cached in DIR/bleu.json."""
    from replay import open_trajectory

    path = os.path.join(out, "bleu.json")
    key = {"trajectory": open_trajectory(store).manifest_sha256,
           "sentences": config.analysis.bleu_sentences}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("key") == key:
            log(f"[3/6] reusing {path}: BLEU {cached['test']:.2f} vs copy baseline "
                f"{cached['copy_baseline']:.2f}")
            return {**cached, "reused": True}
    if not callable(getattr(task, "bleu", None)):
        log("[3/6] the task has no bleu(): no BLEU")
        return {"test": None, "copy_baseline": None, "reused": False}
    log("[3/6] BLEU of greedy translations of the test split, and of copying the source")
    result = task.bleu(final_model(task, store), "test", config.analysis.bleu_sentences)
    bleu = {"key": key, "test": result["bleu"]["score"],
            "copy_baseline": result["copy_baseline"]["score"],
            "signature": result["bleu"]["signature"], "sentences": result["bleu"]["sentences"],
            "examples": result["examples"]}
    write_json(path, bleu)
    log(f"      BLEU {bleu['test']:.2f} vs copy baseline {bleu['copy_baseline']:.2f} "
        f"({bleu['sentences']} sentences, {bleu['signature']})")
    return {**bleu, "reused": False}
