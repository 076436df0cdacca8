"""``lca replay CONFIG_OR_STORE``: compute (or resume) an LCA cube.

Its settings flags are generated from :class:`~replay.settings.ReplaySettings`, one per field
(``--quadrature``, ``--eval-batch-size``, …); the batch-system flags (``--jobs``, ``--cores``, …)
fill the ``cluster_options`` field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import typing
from dataclasses import dataclass
from typing import Any, Literal

from replay.errors import ConfigError
from replay.settings import ReplaySettings, flag_of
from replay.validation import naming

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
    add_settings_flags(p)
    p.add_argument("--task", help="task reference package.module:Factory (store source)")
    p.add_argument("--task-args", help="task arguments as JSON (store source)")
    p.add_argument("--trust-task", action="store_true",
                   help="import the task named in the trajectory's manifest")
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


def add_settings_flags(parser) -> None:
    """One flag per :class:`ReplaySettings` field that has one; unset flags stay None."""
    hints = typing.get_type_hints(ReplaySettings)
    for f in dataclasses.fields(ReplaySettings):
        flag = flag_of(f)
        if flag is None:
            continue
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        tp = hints[f.name]
        if tp is bool:  # booleans are on by default: their flags switch them off
            kw.update(action="store_const", const=not f.default)
        elif f.name == "groups":
            kw.update(action="append", metavar="GROUPING")
        elif f.name == "datasets":
            kw.update(type=lambda text: tuple(x for x in text.split(",") if x),
                      metavar="A,B")
        else:
            choices = _literal(tp)
            if choices:
                kw["choices"] = choices
            else:
                kw["type"] = _scalar(tp)
        parser.add_argument(flag, **kw)


def _literal(tp) -> tuple | None:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _scalar(tp):
    options = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return options[0] if options[0] in (int, float) else str


@dataclass(frozen=True)
class Source:
    """What ``lca replay SOURCE`` replays: the trajectory, its task and the settings."""

    trajectory: str
    task: str | None
    task_args: dict | None
    trust_task: bool
    settings: ReplaySettings


def read_source(source: str, *, task: str | None = None, task_args: str | None = None,
                trust_task: bool = False, overrides: dict | None = None,
                flag_names: bool = True) -> Source:
    """The replay of ``source`` (a YAML config or a trajectory store) with ``overrides``
    (field -> value) over its settings; messages name the flags when ``flag_names``."""
    if source.endswith((".yaml", ".yml")) or os.path.isfile(source):
        from replay.config import load_config

        config = load_config(source)
        if config.record.path is None:
            raise ConfigError(f"{source} has no record.path: the replay needs the trajectory")
        base = config.replay
        trajectory, task, args = config.record.path, config.task.ref, dict(config.task.args)
    else:
        base, trajectory, args = ReplaySettings(), source, None
        if task_args:
            try:
                args = json.loads(task_args)
            except json.JSONDecodeError as err:
                raise ConfigError(f"--task-args is not valid JSON: {err}") from None
    flags = {f.name: flag_of(f) for f in dataclasses.fields(ReplaySettings)}
    with naming(lambda k: flags.get(k) or k) if flag_names else contextlib.nullcontext():
        settings = dataclasses.replace(base, **(overrides or {}))
    return Source(trajectory, task, args, trust_task, settings)


def resolve(args) -> Source:
    """The :class:`Source` of parsed ``lca replay`` arguments."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ReplaySettings)
                 if flag_of(f) is not None and getattr(args, f.name, None) is not None}
    options = {k: getattr(args, k) for k in CLUSTER_KEYS if getattr(args, k) is not None}
    if "cluster_config" in options:
        options["config_name"] = options.pop("cluster_config")
    if options:
        overrides["cluster_options"] = options
    return read_source(args.source, task=args.task, task_args=args.task_args,
                       trust_task=args.trust_task, overrides=overrides)


def main(args) -> int:
    src = resolve(args)
    s = src.settings
    if args.print_job_script:
        from replay.cluster.jobqueue import job_script

        print(job_script(s.scheduler, threads=s.threads, device=s.device,
                         **(s.cluster_options or {})))
        return 0
    from replay.engine.driver import run

    run(src.trajectory, src.task, settings=s, task_args=src.task_args,
        trust_task=src.trust_task)
    return 0
