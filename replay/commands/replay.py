"""``lca replay CONFIG_OR_STORE``: compute (or resume) an LCA cube."""

from __future__ import annotations

import json
import os

from replay.errors import ConfigError

CLUSTER_KEYS = ("jobs", "cores", "memory", "walltime", "queue", "account", "cluster_config",
                "lifetime")


def register(sub) -> None:
    p = sub.add_parser(
        "replay", help="replay a trajectory into an LCA cube (resumes an existing cube)",
        description="Replay a recorded trajectory and write the LCA cube (zarr). SOURCE is a "
        "YAML config (task, record.path and replay sections) or a trajectory store. Options "
        "given here override the config's replay section. Running again on the same cube "
        "computes only the steps not yet done.")
    p.add_argument("source", metavar="CONFIG_OR_STORE")
    p.add_argument("--cube", help="output cube (zarr directory or URL)")
    p.add_argument("--steps", help="only intervals starting at A <= t < B, as A:B")
    p.add_argument("--scheduler", help="sync | threads[:N] | local[:N] (default) | tcp://HOST:PORT "
                   "| SCHEDULER_FILE.json | slurm | pbs | lsf | sge")
    p.add_argument("--quadrature", choices=["first-order", "trapezoid", "simpson", "adaptive"])
    p.add_argument("--tolerance", type=float, help="adaptive: max |residual| per step (loss units)")
    p.add_argument("--max-splits", type=int, help="adaptive: most sub-intervals per step")
    p.add_argument("--gradient", choices=["exact", "sampled"])
    p.add_argument("--batches", type=int, help="sampled: mini-batches per step")
    p.add_argument("--batch-size", type=int, help="sampled: items per mini-batch")
    p.add_argument("--seed", type=int, help="sampled: seed of the mini-batch draws")
    p.add_argument("--datasets", help="comma-separated dataset names (default: all of the task's)")
    p.add_argument("--groups", action="append",
                   help="grouping preset or YAML rules file; repeat for several")
    p.add_argument("--chunk-size", type=int, help="intervals per task and per cube chunk")
    p.add_argument("--precision", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, help="torch threads per task (default 1)")
    p.add_argument("--device", help="torch device for gradients, e.g. cpu or cuda")
    p.add_argument("--nonfinite", choices=["error", "skip"],
                   help="on NaN/Inf: stop (default) or mark the step and go on")
    p.add_argument("--task", help="task reference package.module:Factory (store source)")
    p.add_argument("--task-args", help="task arguments as JSON (store source)")
    p.add_argument("--trust-task", action="store_true",
                   help="import the task named in the trajectory's manifest")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    c = p.add_argument_group("batch-system clusters (--scheduler slurm|pbs|lsf|sge)")
    c.add_argument("--jobs", type=int, help="number of batch jobs (workers)")
    c.add_argument("--cores", type=int, help="cores per job")
    c.add_argument("--memory", help="memory per job, e.g. 4GB")
    c.add_argument("--walltime", help="walltime per job, e.g. 01:00:00")
    c.add_argument("--queue", help="queue / partition")
    c.add_argument("--account", help="account / project")
    c.add_argument("--cluster-config", help="named dask-jobqueue config section")
    c.add_argument("--lifetime", help="worker lifetime (default: from walltime)")
    c.add_argument("--print-job-script", action="store_true",
                   help="print the batch job script and exit without submitting")
    p.set_defaults(func=main)


def resolve(args) -> dict:
    """Keyword arguments of ``replay.run`` from the source (config or store) and the flags."""
    from replay.config import ReplayConfig, load_config

    source = args.source
    if source.endswith((".yaml", ".yml")) or os.path.isfile(source):
        config = load_config(source)
        rc = config.replay
        if config.record.path is None:
            raise ConfigError(f"{source} has no record.path: the replay needs the trajectory")
        kw = {"trajectory": config.record.path, "task": config.task.ref,
              "task_args": dict(config.task.args), "out": config.cube_path()}
    else:
        rc = ReplayConfig()
        kw = {"trajectory": source, "task": args.task, "out": args.cube}
        if args.task_args:
            try:
                kw["task_args"] = json.loads(args.task_args)
            except json.JSONDecodeError as err:
                raise ConfigError(f"--task-args is not valid JSON: {err}") from None
        kw["trust_task"] = args.trust_task
    pick = lambda flag, default: default if flag is None else flag
    gradient = pick(args.gradient, rc.gradient)
    if gradient == "sampled":
        from replay.engine.gradients import Sampled

        batches, size = pick(args.batches, rc.batches), pick(args.batch_size, rc.batch_size)
        if batches is None or size is None:
            raise ConfigError("--gradient sampled needs --batches M and --batch-size B "
                              "(or replay.batches / replay.batch_size in the config)")
        gradient = Sampled(batches=batches, batch_size=size, seed=pick(args.seed, rc.seed))
    groups = args.groups or list(rc.groups)
    kw.update(
        out=args.cube or kw.get("out"),
        gradient=gradient,
        quadrature=pick(args.quadrature, rc.quadrature),
        tolerance=pick(args.tolerance, rc.tolerance),
        max_splits=pick(args.max_splits, rc.max_splits),
        groups=groups,
        datasets=args.datasets.split(",") if args.datasets else rc.datasets,
        scheduler=pick(args.scheduler, rc.scheduler),
        steps=pick(args.steps, rc.steps),
        chunk_size=pick(args.chunk_size, rc.chunk_size),
        precision=pick(args.precision, rc.precision),
        threads=pick(args.threads, getattr(rc, "threads", 1)),
        device=pick(args.device, getattr(rc, "device", "cpu")),
        nonfinite=pick(args.nonfinite, getattr(rc, "nonfinite", "error")),
        progress=not args.no_progress,
    )
    options = {k: getattr(args, k) for k in CLUSTER_KEYS if getattr(args, k) is not None}
    if "cluster_config" in options:
        options["config_name"] = options.pop("cluster_config")
    if options:
        kw["cluster_options"] = options
    return kw


def main(args) -> int:
    kw = resolve(args)
    if args.print_job_script:
        from replay.cluster.jobqueue import job_script

        scheduler = kw["scheduler"]
        print(job_script(scheduler, threads=kw["threads"], device=kw["device"],
                         **kw.get("cluster_options", {})))
        return 0
    from replay.engine.driver import run

    run(**kw)
    return 0
