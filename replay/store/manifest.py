"""manifest.json of a trajectory store (formats 1 to 3): layout, validation, atomic writes, file access.

The manifest is the table of contents: a file that it does not list does not exist for a
reader, which is what makes crash-safety simple (data files are written and synced first, the
manifest is replaced atomically after each completed step). Layout::

    {"format_version": 1, "lca_replay_version": ..., "created": ISO-8601 UTC,
     "mode": "delta" | "full", "keyframe_every": int, "every": int,
     "task": "pkg.mod:Factory" | null, "task_args": {...},
     "params": [{"name", "shape", "dtype"}, ...],          # recorded, canonical order
     "aliases": {alias: canonical},                          # tied parameters
     "state": [{"name", "shape", "dtype", "kind": "frozen" | "buffer"}, ...],
     "steps": [{"step", "files": {"keyframe"|"delta"|"state": relpath},
                "xxh3_128" | "sha256": {relpath: hex}, "bytes": {relpath: int},
                "loss": float | null, "lr": [float, ...] | null, "time": unix seconds,
                "interval_losses": [...],  # only with every > 1: losses of steps (prev, step]
                "skipped": true,           # only if the optimizer skipped the update into step
                "interval_skipped": [t, ...]  # only with every > 1: skipped updates in (prev, step]
               }, ...]}

A skipped update (an AMP step that the gradient scaler skipped on overflow) is still a step:
θ_step equals θ_{step-1}, so its Δ is 0.

``files["delta"]`` of step t is Δ from t to the next recorded step (named by t). Each file's
hash sits in the table of its algorithm (:data:`replay.store.files.DIGESTS`): formats 1 and 2
hash every file with sha256, format 3 names the algorithm per file (the Recorder uses
xxh3_128 where the xxhash package is installed) and is otherwise format 2.
"""

from __future__ import annotations

import json
import os
import posixpath

from replay.errors import TrajectoryError
from replay.store.files import DIGESTS, FileWriter, hexdigest

# Dtype names a store may hold (torch-free here: the recorder's writer process reads this module).
PARAM_DTYPES = ("float16", "bfloat16", "float32", "float64")
STATE_DTYPES = PARAM_DTYPES + ("int8", "int16", "int32", "int64", "uint8", "bool")

FORMAT_VERSION = 3
# Format 1 differs from 2 in its delta files (one Δ tensor per parameter), 2 from 3 in hashing
# every file with sha256; both are still read.
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
FILE_ROLES = ("keyframe", "delta", "state")
_DIRS = {"keyframe": "keyframes", "delta": "deltas", "state": "state"}
_FIX = "re-record or restore the file; `lca verify STORE` lists all problems"


def file_name(role: str, step: int) -> str:
    """Relative path of a data file, e.g. ``keyframes/step-00000100.safetensors``."""
    return f"{_DIRS[role]}/step-{step:08d}.safetensors"


def is_remote(path: str) -> bool:
    """True for fsspec URLs (``s3://``, ``memory://``…); ``file://`` counts as local."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return path[len("file://"):] if path.startswith("file://") else path


# ------------------------------------------------------------------------------------ reading

class Source:
    """Whole-file reads from a local directory or an fsspec URL (no mmap: unsafe on NFS)."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root).rstrip("/") or "/"
        self._fs = None
        if is_remote(self.root):
            import fsspec  # only needed for remote stores

            self._fs, self._fs_root = fsspec.core.url_to_fs(self.root)
        else:
            self.root = local_path(self.root)

    def read(self, rel: str) -> bytes:
        """Bytes of ``rel``; a missing file raises FileNotFoundError."""
        if self._fs is not None:
            return self._fs.cat_file(posixpath.join(self._fs_root, rel))
        with open(os.path.join(self.root, rel), "rb") as f:
            return f.read()


def read_manifest(source: Source) -> tuple[dict, bytes]:
    """Parsed and validated manifest plus its raw bytes; one-line TrajectoryError otherwise."""
    where = f"{source.root}/{MANIFEST}"
    try:
        raw = source.read(MANIFEST)
    except FileNotFoundError:
        raise TrajectoryError(
            f"no trajectory at {source.root}: {MANIFEST} not found "
            "(record one with replay.Recorder or check the path)") from None
    except OSError as err:
        raise TrajectoryError(f"cannot read {where}: {err}") from None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrajectoryError(
            f"{where} is not valid JSON ({err}); the store is damaged: {_FIX}") from None
    validate(manifest, where)
    return manifest, raw


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise TrajectoryError(f"{where}: {what}; {_FIX}")


def validate(m: object, where: str) -> None:
    """Check the structure of a parsed manifest; raise one-line TrajectoryError naming the key."""
    _need(isinstance(m, dict), where, "top level is not a JSON object")
    version = m.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        from replay import __version__

        raise TrajectoryError(
            f"{where}: format_version {version!r} is not supported by lca-replay {__version__} "
            f"(it reads formats {', '.join(map(str, READABLE_VERSIONS))}); use the lca-replay "
            "version that recorded it")
    for key in ("mode", "keyframe_every", "every", "params", "aliases", "state", "steps"):
        _need(key in m, where, f"missing key {key!r}")
    _need(m["mode"] in ("delta", "full"), where, f"mode {m['mode']!r} is not 'delta' or 'full'")
    for key in ("keyframe_every", "every"):
        _need(isinstance(m[key], int) and m[key] >= 1, where, f"{key} must be a positive integer")
    _need(m.get("task") is None or isinstance(m["task"], str), where, "task must be a string")
    _need(isinstance(m.get("task_args", {}), dict), where, "task_args must be an object")
    names = set()
    for section, dtypes in (("params", PARAM_DTYPES), ("state", STATE_DTYPES)):
        _need(isinstance(m[section], list), where, f"{section!r} must be a list")
        for i, p in enumerate(m[section]):
            ok = (isinstance(p, dict) and isinstance(p.get("name"), str)
                  and isinstance(p.get("shape"), list)
                  and all(isinstance(s, int) and s >= 0 for s in p["shape"])
                  and p.get("dtype") in dtypes)
            _need(ok, where, f"{section}[{i}] needs a name, a shape and one of the dtypes "
                             f"{', '.join(dtypes)}")
            _need(p["name"] not in names, where, f"tensor {p['name']!r} is listed twice")
            names.add(p["name"])
    _need(isinstance(m["aliases"], dict)
          and all(isinstance(v, str) and v in names for v in m["aliases"].values()),
          where, "aliases must map names to listed tensors")
    _need(isinstance(m["steps"], list), where, "'steps' must be a list")
    last = -1
    for i, e in enumerate(m["steps"]):
        ok = isinstance(e, dict) and isinstance(e.get("step"), int) and e["step"] > last
        _need(ok, where, f"steps[{i}] needs an integer step greater than the previous one")
        prev, last = last, e["step"]
        files, size = e.get("files"), e.get("bytes")
        tables = [e[name] for name in DIGESTS if name in e]
        _need(isinstance(files, dict) and isinstance(size, dict) and tables
              and all(isinstance(t, dict) for t in tables),
              where, f"step {last}: files, {' or '.join(DIGESTS)} and bytes must be objects")
        for role, rel in files.items():
            _need(role in FILE_ROLES, where, f"step {last}: unknown file role {role!r}")
            # Relative paths inside the store only: a manifest must not point readers elsewhere.
            ok = (isinstance(rel, str) and not rel.startswith("/") and ".." not in rel.split("/")
                  and sum(isinstance(t.get(rel), str) for t in tables) == 1
                  and isinstance(size.get(rel), int))
            _need(ok, where, f"step {last}: bad {role} entry {rel!r} (needs a relative path "
                             f"with one hash ({' or '.join(DIGESTS)}) and a byte count)")
        _need(i > 0 or "keyframe" in files, where, "the first recorded step has no keyframe")
        _need(isinstance(e.get("skipped", False), bool), where,
              f"step {last}: skipped must be true or false")
        gaps = e.get("interval_skipped", [])
        _need(isinstance(gaps, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and prev < t <= last for t in gaps)
              and gaps == sorted(set(gaps)), where,
              f"step {last}: interval_skipped must list ascending steps after {prev} up to {last}")


def file_digest(entry: dict, rel: str) -> tuple[str, str]:
    """(algorithm, hex digest) that a validated step entry records for its file ``rel``."""
    for name in DIGESTS:
        if rel in entry.get(name, ()):
            return name, entry[name][rel]
    raise KeyError(rel)


def digest_problem(entry: dict, rel: str, data: bytes) -> str | None:
    """What is wrong with the bytes ``data`` of file ``rel`` against the hash its step
    ``entry`` records ("sha256 1a2b… does not match the manifest's 3c4d… (corrupted)"), or None."""
    name, expected = file_digest(entry, rel)
    try:
        digest = hexdigest(name, data)
    except ImportError:
        raise TrajectoryError(f"{rel}: the manifest checks this file with {name}, which needs "
                              f"the xxhash package: pip install xxhash") from None
    if digest == expected:
        return None
    return f"{name} {digest[:12]}… does not match the manifest's {expected[:12]}… (corrupted)"


# ------------------------------------------------------------------------------------ writing

def write_atomic(directory: str, rel: str, data: bytes | list) -> None:
    """Write ``directory/rel`` so that readers see the old file or the whole new one, never part
    (temporary file in the same directory, fsync, rename: see :class:`FileWriter`). ``data``
    may be a list of byte chunks, written one after the other. The directory is not fsynced:
    for the manifest, a power loss that undoes the rename leaves the previous one, whole.
    """
    FileWriter(direct=False).write(os.path.join(directory, rel),
                                   data if isinstance(data, list) else [data], digest=None)


class ManifestWriter:
    """Builds manifest.json incrementally: the header once, one pre-serialised line per step.

    Steps before the last live in a growing bytearray (appending is amortised O(1)); only the
    last entry is kept as a dict, because it gains its delta file when the next step arrives.
    :meth:`chunks` hands the pieces to the file writer without joining them.
    """

    def __init__(self, header: dict):
        lines = [f'  "format_version": {json.dumps(header["format_version"])}']
        for key, value in header.items():
            if key == "format_version":
                continue
            if isinstance(value, list) and value:
                items = ",\n".join("    " + json.dumps(v) for v in value)
                lines.append(f"  {json.dumps(key)}: [\n{items}\n  ]")
            else:
                lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
        self._head = ("{\n" + ",\n".join(lines) + ',\n  "steps": [').encode()
        self._body = bytearray()
        self.last: dict | None = None
        self._last_line = b""

    def append(self, entry: dict) -> None:
        if self.last is not None:
            self._body += self._last_line + b",\n"
        self.last = entry
        self.refresh_last()

    def refresh_last(self) -> None:
        """Re-serialise the last entry after a change in place (it gained its delta file)."""
        self._last_line = ("    " + json.dumps(self.last)).encode()

    def chunks(self) -> list[bytes | bytearray]:
        if self.last is None:
            return [self._head, b"]\n}\n"]
        return [self._head, b"\n", self._body, self._last_line, b"\n  ]\n}\n"]

    def text(self) -> str:
        return b"".join(self.chunks()).decode()
