"""The code's shape: no import cycle between modules, no module over 400 lines, the writer
process torch-free, and the settings defined once for every front end."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from replay.settings import RUN_OPTIONS, YAML_KEYS, ReplaySettings, flag_of

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("replay", "analysis")
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere: module level, in functions, under
    TYPE_CHECKING. ``from a.b import c`` counts as ``a.b.c`` when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known
                       else node.module for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_modules_are_concept_sized():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_writer_process_imports_no_torch():
    # The Recorder's writer process must start fast: numpy and the standard library only.
    code = ("import sys; import replay.record.writer; "
            "print(sorted(m for m in ('torch', 'zarr', 'dask', 'xarray', 'numba') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out == "[]"


def test_every_setting_reaches_every_front_end():
    from replay.commands.replay import register

    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    replay_parser = parser._subparsers._group_actions[0].choices["replay"]
    flags = {opt for action in replay_parser._actions for opt in action.option_strings}
    for f in dataclasses.fields(ReplaySettings):
        flag = flag_of(f)
        if flag is not None:
            assert flag in flags, f"ReplaySettings.{f.name} has no flag {flag} in lca replay"
        if f.metadata["run"] is not None:
            assert RUN_OPTIONS[f.metadata["run"] or f.name] == f.name
        assert (f.name in YAML_KEYS) == f.metadata["yaml"]
        assert f.metadata["help"], f"ReplaySettings.{f.name} has no help text"
    # defaults are declared once: the YAML section and the CLI start from the same object
    from replay.config import Config

    assert typing.get_type_hints(Config)["replay"] is ReplaySettings


@pytest.mark.parametrize(("options", "message"), [
    ({"quadratur": "simpson"}, r"^replay\.run\(\) got unknown option\(s\) 'quadratur'; valid "
                               r"options: batch_size, chunk_size, cluster_options, datasets, "),
    ({"threads": "two"}, r"^replay\.run\(threads=\.\.\.\) must be an integer, got 'two' "
                         r"\(string\)$"),
    ({"threads": 0}, r"^replay\.run\(threads=\.\.\.\) must be >= 1, got 0$"),
    ({"quadrature": "adaptive", "max_splits": 6},
     r"^replay\.run\(max_splits=\.\.\.\) must be a power of two >= 2 \(composite Simpson "
     r"doubles\), got 6$"),
    ({"batch_size": 0}, r"^replay\.run\(batch_size=\.\.\.\) must be >= 1, got 0$"),
    ({"steps": "3-7"}, r"^replay\.run\(steps=\.\.\.\) must look like 'A:B'"),
    ({"gradient": "sampled"}, r"^gradient 'sampled' needs a sample size: pass replay\.Sampled"),
])
def test_run_options_are_checked_by_their_keyword(options, message):
    from replay.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        ReplaySettings.from_options(options)


def test_run_options_map_onto_settings():
    import replay

    s = ReplaySettings.from_options({"out": "c.zarr", "batch_size": 7, "steps": slice(2, None),
                                     "groups": "tensor", "datasets": ["train"],
                                     "gradient": replay.Sampled(batches=2, batch_size=3)})
    assert (s.cube, s.eval_batch_size, s.steps, s.groups, s.datasets) == (
        "c.zarr", 7, "2:", ("tensor",), ("train",))
    assert (s.gradient, s.batches, s.batch_size, s.seed) == ("sampled", 2, 3, 0)
    assert s.mode == replay.Sampled(batches=2, batch_size=3)
