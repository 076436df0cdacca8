"""``lca info STORE`` and ``lca verify STORE``: inspect and check a trajectory store."""

from __future__ import annotations

import json
import math

from replay.errors import TrajectoryError


def register(subparsers) -> None:
    info = subparsers.add_parser(
        "info", help="summarise a trajectory store",
        description="Steps, parameters, recording mode, size on disk and task of a trajectory.")
    info.add_argument("store", metavar="STORE", help="trajectory directory or fsspec URL")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=cmd_info)

    verify = subparsers.add_parser(
        "verify", help="check every file and bit-exact reconstruction of a trajectory store",
        description="Checks each file's size and hash against manifest.json, decodes every "
                    "file, and checks that walking the deltas rebuilds each keyframe bit for bit.")
    verify.add_argument("store", metavar="STORE", help="trajectory directory or fsspec URL")
    verify.set_defaults(func=cmd_verify)


def summary(traj) -> dict:
    """The figures ``lca info`` prints, as a JSON-ready dict."""
    elements = sum(math.prod(traj.shapes[n]) for n in traj.names)
    nbytes = traj.nbytes()
    steps = len(traj.steps)
    dtypes = sorted({str(traj.dtypes[n]).replace("torch.", "") for n in traj.names})
    return {
        "path": traj.path,
        "format_version": traj.manifest["format_version"],
        "steps": steps,
        "first_step": traj.steps[0] if steps else None,
        "last_step": traj.steps[-1] if steps else None,
        "every": traj.every,
        "mode": traj.mode,
        "keyframe_every": traj.keyframe_every,
        "keyframes": len(traj.keyframe_steps),
        "params": len(traj.names),
        "elements": elements,
        "dtypes": dtypes,
        "aliases": len(traj.aliases),
        "state_tensors": len(traj.state_names),
        "bytes": nbytes,
        "bytes_per_param_step": nbytes / (elements * steps) if elements and steps else None,
        "task": traj.task,
        "task_args": traj.task_args,
        "created": traj.manifest.get("created"),
        "lca_replay_version": traj.manifest.get("lca_replay_version"),
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_info(args) -> int:
    from replay.store.trajectory import open_trajectory

    s = summary(open_trajectory(args.store))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    span = f"{s['first_step']}..{s['last_step']}" if s["steps"] else "none"
    kf = ("a keyframe at every step" if s["mode"] == "full"
          else f"keyframe every {s['keyframe_every']} steps ({s['keyframes']} keyframes)")
    per = f"{s['bytes_per_param_step']:.3f}" if s["bytes_per_param_step"] else "-"
    task = (s["task"] + (" " + json.dumps(s["task_args"]) if s["task_args"] else "")
            if s["task"] else "(none recorded)")
    rows = [
        ("trajectory", f"{s['path']} (format v{s['format_version']}, "
                       f"lca-replay {s['lca_replay_version']}, created {s['created']})"),
        ("steps", f"{s['steps']} recorded, {span}, every {s['every']}"),
        ("params", f"{s['params']} tensors, {s['elements']:,} elements "
                   f"({', '.join(s['dtypes'])}); {s['aliases']} tied aliases; "
                   f"{s['state_tensors']} state tensors"),
        ("mode", f"{s['mode']}, {kf}"),
        ("size", f"{_size(s['bytes'])} on disk ({s['bytes']:,} bytes)"),
        ("bytes/param/step", per),
        ("task", task),
    ]
    for key, value in rows:
        print(f"{key:<17} {value}")
    return 0


def cmd_verify(args) -> int:
    from replay.store.trajectory import open_trajectory

    traj = open_trajectory(args.store)
    found = traj.problems()
    if found:
        for line in found[1:]:
            print(f"  also: {line}")
        more = f" (and {len(found) - 1} more problem(s) listed above)" if len(found) > 1 else ""
        raise TrajectoryError(found[0] + more)
    from replay.store.verify import rebuilt_keyframes

    print(f"OK {traj.path}: {len(traj.steps)} steps, {len(traj.files())} files "
          f"({traj.nbytes():,} bytes) match their hashes; {rebuilt_keyframes(traj)} of "
          f"{len(traj.keyframe_steps)} keyframes rebuilt bit for bit from deltas")
    return 0
