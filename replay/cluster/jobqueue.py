"""Batch clusters: Dask workers as batch jobs (dask-jobqueue).

Two ways to spread a replay over a batch system:

- :func:`make_jobqueue_cluster` (``lca replay --scheduler slurm``): an interactive Dask cluster
  whose workers are batch jobs (dask-jobqueue), configured from dask's own config sections
  ``jobqueue.<kind>`` (or a named one), with per-call overrides. :func:`job_script` shows the
  script such a job runs.
- :mod:`replay.cluster.job_array` (``lca submit``): fire and forget, a SLURM job array of step slices.
"""

from __future__ import annotations

from importlib import resources

import dask.config
import yaml

from replay.errors import LCAError
from replay.cluster.worker_env import QUIET_DASK, thread_env

__all__ = [
    "ClusterError",
    "KINDS",
    "job_script",
    "make_jobqueue_cluster",
    "walltime_seconds",
    "worker_lifetime",
]


class ClusterError(LCAError, RuntimeError):
    """A batch cluster cannot be built or a batch job cannot be submitted."""


# kind -> dask-jobqueue class name. The keyword that carries `account` differs per system.
KINDS = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "moab": "MoabCluster",
    "lsf": "LSFCluster",
    "sge": "SGECluster",
    "oar": "OARCluster",
    "htcondor": "HTCondorCluster",
}
_ACCOUNT_KEYWORD = {"slurm": "account", "pbs": "account", "moab": "account",
                    "lsf": "project", "sge": "project", "oar": "project"}
# One GPU per job, in the system's own words; other systems need it in their config section.
_GPU_DIRECTIVES = {"slurm": ["--gres=gpu:1"], "lsf": ['-gpu "num=1"']}
# Keywords JobQueueCluster consumes itself; everything else in `extra` goes to each job.
_CLUSTER_ONLY = {"scheduler_options", "shared_temp_directory", "silence_logs", "name",
                 "asynchronous", "loop", "security", "protocol", "n_workers", "scheduler_cls"}

_defaults_loaded = False


def _load_defaults() -> None:
    """Put replay/jobqueue.yaml under dask's config (lowest priority: user files win)."""
    global _defaults_loaded
    if not _defaults_loaded:
        text = resources.files("replay.cluster").joinpath("jobqueue.yaml").read_text()
        dask.config.update_defaults(yaml.safe_load(text))
        _defaults_loaded = True


def _import_jobqueue(kind: str):
    try:
        import dask_jobqueue
    except ImportError as err:
        raise ClusterError(
            f"--scheduler {kind} needs dask-jobqueue: pip install 'lca-replay[cluster]'"
        ) from err
    return dask_jobqueue


def _config_section(kind: str, config_name: str | None) -> dict:
    """The dask config section a cluster of `kind` reads, completed from ``jobqueue.<kind>``."""
    base = dict(dask.config.get(f"jobqueue.{kind}", {}) or {})
    if not config_name or config_name == kind:
        return base
    named = dask.config.get(f"jobqueue.{config_name}", None)
    if named is None:
        raise ClusterError(
            f"no dask config section jobqueue.{config_name}: add it to "
            f"~/.config/dask/jobqueue.yaml (e.g. jobqueue: {{{config_name}: {{cores: 8, "
            f"memory: 32GB, queue: ...}}}}) or leave out config_name"
        )
    # dask-jobqueue reads every key from the named section; fill the ones a site left out from
    # the kind's defaults so a named section can hold only what differs.
    merged = {**base, **named}
    if merged != named:
        dask.config.set({f"jobqueue.{config_name}": merged})
    return merged


def walltime_seconds(walltime: str | int | None, kind: str = "slurm") -> int | None:
    """Seconds in a batch walltime, read the way `kind` reads it (None when there is none).

    slurm: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``;
    lsf: ``MM`` or ``HH:MM``; pbs, sge, oar, moab: ``SS``, ``MM:SS`` or ``HH:MM:SS``.
    """
    if walltime is None or walltime == "":
        return None
    text = str(walltime).strip()
    try:
        days, _, clock = text.rpartition("-")
        fields = [int(f) for f in clock.split(":")]
        if len(fields) > 3 or (days and kind != "slurm") or min(fields) < 0:
            raise ValueError(text)
        if days:  # slurm D-HH[:MM[:SS]]
            h, m, s = (fields + [0, 0])[:3]
            return ((int(days) * 24 + h) * 60 + m) * 60 + s
        if kind == "slurm" and len(fields) < 3:  # MM or MM:SS
            m, s = (fields + [0])[:2]
            return m * 60 + s
        if kind == "lsf":  # [HH:]MM
            if len(fields) > 2:
                raise ValueError(text)
            h, m = ([0] + fields)[-2:]
            return (h * 60 + m) * 60
        h, m, s = ([0, 0] + fields)[-3:]
        return (h * 60 + m) * 60 + s
    except ValueError:
        raise ClusterError(
            f"walltime {walltime!r} is not a {kind} duration: write it like '01:30:00' "
            f"(in the walltime option or jobqueue.{kind}.walltime)"
        ) from None


def worker_lifetime(walltime_s: float | None) -> tuple[int, int] | None:
    """(lifetime, stagger) in seconds for workers of jobs with this walltime, or None.

    A worker retires gracefully after lifetime ± stagger, before the batch system kills its job:
    its tasks go back to the scheduler and the cluster starts a replacement job. The stagger keeps
    all workers from retiring at once; the margin leaves time to hand back results.
    """
    if walltime_s is None or walltime_s < 180:
        return None
    stagger = int(min(max(0.05 * walltime_s, 30), 300))
    margin = int(min(max(0.05 * walltime_s, 60), 600))
    return int(walltime_s) - stagger - margin, stagger


def _lifetime_args(lifetime, walltime, kind: str) -> list[str]:
    from dask.utils import parse_timedelta

    if lifetime is None:
        lifetime = dask.config.get("lca.cluster.lifetime")
    if lifetime in (None, False, "none", "off"):
        return []
    stagger = dask.config.get("lca.cluster.lifetime-stagger")
    if lifetime == "auto":
        auto = worker_lifetime(walltime_seconds(walltime, kind))
        if auto is None:
            return []
        lifetime_s, auto_stagger = auto
    else:
        lifetime_s = int(parse_timedelta(lifetime))
        auto_stagger = min(300, lifetime_s // 20)
    stagger_s = auto_stagger if stagger == "auto" else int(parse_timedelta(stagger or 0))
    # No --lifetime-restart: a worker restarted inside the same job would die at the walltime
    # anyway; the adaptive cluster submits a fresh job instead.
    args = ["--lifetime", f"{lifetime_s}s"]
    if stagger_s:
        args += ["--lifetime-stagger", f"{stagger_s}s"]
    return args


def _cluster_kwargs(kind, *, config_name=None, cores=None, memory=None, walltime=None,
                    queue=None, account=None, lifetime=None, device="cpu", threads=1,
                    python=None, processes=None, extra=None) -> tuple[type, dict]:
    """The dask-jobqueue class for `kind` and the keyword arguments that build it."""
    if kind not in KINDS:
        raise ClusterError(
            f"unknown job queue system {kind!r}: choose one of {', '.join(sorted(KINDS))}"
        )
    if device not in ("cpu", "cuda"):
        raise ClusterError(f"device {device!r} cannot run on a batch cluster: use cpu or cuda")
    if not isinstance(threads, int) or threads < 1:
        raise ClusterError(f"threads must be a positive integer (torch threads per task), "
                           f"got {threads!r}")
    jobqueue = _import_jobqueue(kind)
    _load_defaults()
    section = _config_section(kind, config_name)
    name = config_name or kind
    kw = dict(extra or {})
    if config_name:
        kw["config_name"] = config_name
    for key, value in (("cores", cores), ("memory", memory), ("python", python),
                       ("processes", processes), ("walltime", walltime)):
        if value is not None:
            kw[key] = value
    if kind == "htcondor" and (queue or account or walltime):
        raise ClusterError("htcondor has no queue, account or walltime option: set them with "
                           "job_extra_directives in jobqueue.htcondor")
    if queue is not None:
        kw["queue"] = queue
    if account is not None:
        kw[_ACCOUNT_KEYWORD[kind]] = account

    cores = kw.get("cores", section.get("cores"))
    if cores is None or kw.get("memory", section.get("memory")) is None:
        raise ClusterError(
            f"cores and memory per {kind} job are not set: pass them (cores=8, memory='32GB') or "
            f"set jobqueue.{name}.cores and jobqueue.{name}.memory in ~/.config/dask/jobqueue.yaml"
        )
    cores = int(cores)
    procs = kw.get("processes", section.get("processes"))
    if device == "cuda":
        if procs not in (None, 1):
            raise ClusterError(f"device cuda runs one worker per job with one GPU: set "
                               f"processes=1, not {procs} (jobqueue.{name}.processes)")
        procs, tasks_per_proc = 1, 1
        directives = list(kw.get("job_extra_directives",
                                 section.get("job-extra-directives") or []))
        if kind in _GPU_DIRECTIVES:
            directives += [d for d in _GPU_DIRECTIVES[kind] if d not in directives]
        elif not directives:
            raise ClusterError(f"device cuda on {kind}: add your site's one-GPU request to "
                               f"jobqueue.{name}.job-extra-directives")
        kw["job_extra_directives"] = directives
    else:
        # Like the engine's LocalCluster: single-task worker processes, `threads` torch threads
        # each, as many as the job's cores hold (unless the config fixes the processes).
        procs = procs or max(1, cores // threads)
        tasks_per_proc = max(1, cores // procs // threads)
    kw["processes"] = procs

    args = list(kw.get("worker_extra_args", section.get("worker-extra-args") or []))
    if tasks_per_proc != max(1, cores // procs):
        # dask-jobqueue gives each process cores // processes Dask threads; a later --nthreads
        # wins, so each worker runs only as many tasks as it has cores for at `threads` each.
        args += ["--nthreads", str(tasks_per_proc)]
    args += _lifetime_args(lifetime, kw.get("walltime", section.get("walltime")), kind)
    if device == "cuda":
        args += ["--resources", "GPU=1"]  # SLURM sets CUDA_VISIBLE_DEVICES: the worker sees cuda:0
    kw["worker_extra_args"] = args
    # The engine sets torch and numba threads per task; these cover BLAS/OpenMP libraries too.
    prologue = list(kw.get("job_script_prologue", section.get("job-script-prologue")
                           or section.get("env-extra") or []))
    prologue.append("export " + " ".join(f"{k}={v}" for k, v in thread_env(threads).items()))
    prologue.append("export " + " ".join(_dask_env(QUIET_DASK)))
    kw["job_script_prologue"] = prologue
    if section.get("name") in (None, "dask-worker"):
        kw.setdefault("job_name", dask.config.get("lca.cluster.job-name"))
    return getattr(jobqueue, KINDS[kind]), kw


def _dask_env(settings: dict) -> list[str]:
    """``DASK_A__B_C=value`` assignments: dask config that the job's worker processes read from
    their environment (the job starts them with ``dask worker``, out of reach of
    ``dask.config.set`` here)."""
    return [f"DASK_{key.upper().replace('.', '__').replace('-', '_')}={value}"
            for key, value in settings.items()]


def make_jobqueue_cluster(kind: str, *, config_name: str | None = None, jobs: int | None = None,
                          cores: int | None = None, memory: str | None = None,
                          walltime: str | None = None, queue: str | None = None,
                          account: str | None = None, lifetime: str | bool | None = None,
                          device: str = "cpu", threads: int = 1, python: str | None = None,
                          processes: int | None = None, extra: dict | None = None):
    """Start a dask-jobqueue cluster of `kind` (slurm, pbs, lsf, sge, oar, htcondor, moab).

    Settings come from dask's config section ``jobqueue.<kind>`` (or ``jobqueue.<config_name>``);
    the keyword arguments override it. `jobs` batch jobs (default ``lca.cluster.jobs``) are kept
    running adaptively, so a worker that retires before its walltime (`lifetime`: None = from
    ``lca.cluster.lifetime``, False = never, or a duration like "50m") is replaced by a new job.
    `threads`: torch threads per replay task (the engine's ``threads``). Each job runs
    `processes` worker processes (default cores // threads) holding cores // processes //
    threads tasks each, with OMP/MKL/OpenBLAS/numba threads = `threads`. ``device="cuda"``: one
    worker, one task and one GPU per job. `extra`: further keyword arguments for the
    dask-jobqueue class (log_directory, interface, scheduler_options, ...).
    Returns the cluster; the caller connects a ``distributed.Client`` and closes both.
    """
    cls, kw = _cluster_kwargs(kind, config_name=config_name, cores=cores, memory=memory,
                              walltime=walltime, queue=queue, account=account, lifetime=lifetime,
                              device=device, threads=threads, python=python,
                              processes=processes, extra=extra)
    try:
        with dask.config.set(QUIET_DASK):  # for the scheduler, which runs in this process
            cluster = cls(**kw)
    except (TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterError(f"cannot build a {cls.__name__} from jobqueue.{config_name or kind} and "
                           f"the options given: {first}") from err
    n = jobs if jobs is not None else dask.config.get("lca.cluster.jobs")
    cluster.adapt(minimum_jobs=n, maximum_jobs=n)
    return cluster


def job_script(kind: str, *, config_name: str | None = None, jobs: int | None = None,
               cores: int | None = None, memory: str | None = None, walltime: str | None = None,
               queue: str | None = None, account: str | None = None,
               lifetime: str | bool | None = None, device: str = "cpu", threads: int = 1,
               python: str | None = None, processes: int | None = None,
               extra: dict | None = None) -> str:
    """The batch script one worker job of :func:`make_jobqueue_cluster` would run.

    Same arguments (`jobs` is accepted and ignored). Built without starting a scheduler: the
    script's scheduler address reads ``tcp://<scheduler-address>:8786``.
    """
    cls, kw = _cluster_kwargs(kind, config_name=config_name, cores=cores, memory=memory,
                              walltime=walltime, queue=queue, account=account, lifetime=lifetime,
                              device=device, threads=threads, python=python,
                              processes=processes, extra=extra)
    job_kw = {k: v for k, v in kw.items() if k not in _CLUSTER_ONLY}
    job_kw.setdefault("interface", dask.config.get(f"jobqueue.{config_name or kind}.interface",
                                                   None))
    try:
        job = cls.job_cls("tcp://<scheduler-address>:8786", name="lca-worker", **job_kw)
    except (TypeError, ValueError) as err:
        raise ClusterError(f"cannot write a {kind} job script from jobqueue.{config_name or kind} "
                           f"and the options given: {err}") from err
    return job.job_script()

