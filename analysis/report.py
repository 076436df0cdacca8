"""``write_report``: figures as PNGs, an offline ``index.html`` and ``summary.md`` in one folder.

The folder must be new, empty, or a folder a previous report wrote: the report keeps a list of
the files it wrote in ``.lca-report.json`` and refuses a folder holding anything else, so it
never overwrites user data. Files of a previous report that this one does not write again
(a figure now omitted) are removed, so the folder always matches its ``index.html``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import xarray as xr

from analysis.compare import compare
from analysis.contents import Planned, plan
from analysis.cube import describe, gradient_text, provenance
from analysis.findings import Table, findings, main_grouping, partial_sentence
from analysis.ops import groupings, select_done, select_grouping
from analysis.render import markdown, page
from analysis.tables import comparison_table, groups_table, reconstruction_table
from replay.errors import LCAError

MANIFEST = ".lca-report.json"
LOAD_LIMIT = 1 << 30  # cubes below 1 GiB are read into memory once instead of per figure


def _owned_files(out: Path) -> set[str]:
    """Files a previous report wrote in ``out``; LCAError if ``out`` holds anything else."""
    if not out.exists():
        return set()
    if not out.is_dir():
        raise LCAError(f"report folder {out} is a file: give a new or empty folder with -o")
    present = {p.name for p in out.iterdir()}
    if not present:
        return set()
    owned: set[str] = set()
    if MANIFEST in present:
        try:
            owned = set(json.loads((out / MANIFEST).read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            owned = set()
    foreign = sorted(present - owned - {MANIFEST, MANIFEST + ".partial"})
    if foreign:
        raise LCAError(f"report folder {out} holds files a report did not write ({foreign[0]}"
                       f"{', …' if len(foreign) > 1 else ''}): give a new or empty folder with -o")
    return owned


def _write_manifest(out: Path, files) -> None:
    tmp = out / (MANIFEST + ".partial")
    tmp.write_text(json.dumps({"written_by": "lca report", "files": sorted(files)}, indent=1))
    os.replace(tmp, out / MANIFEST)


def _prepare(ds: xr.Dataset) -> xr.Dataset:
    ds = select_done(ds)
    return ds.load() if ds.nbytes < LOAD_LIMIT else ds


def _render(spec: Planned, path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no display

    fig = Figure(figsize=spec.size, layout="constrained")
    spec.draw(fig)
    fig.savefig(path, dpi=110)


def _tables(cube: xr.Dataset, cmp: xr.Dataset | None) -> list[tuple[str, Table]]:
    main = main_grouping(cube)
    order = [main] + [g for g in groupings(cube) if g != main]
    out = [("Loss reconstruction", reconstruction_table(cube))]
    for g in order:
        table = groups_table(cube, g)
        n = select_grouping(cube["group"], g).sizes["group"]
        which = "all groups" if len(table[1]) >= n else "those that helped and hurt most"
        out.append((f"Groups by total LCA: {g} grouping ({which})", table))
    if cmp is not None:
        out.append(("Comparison with the reference", comparison_table(cmp)))
    return out


def write_report(cube: xr.Dataset, out: str | os.PathLike, reference: xr.Dataset | None = None,
                 *, cube_path: str | None = None, reference_path: str | None = None,
                 extra_tables: list[tuple[str, Table]] = ()) -> Path:
    """Write figures, ``index.html`` and ``summary.md`` for ``cube`` into folder ``out``.

    The figures follow the groupings the cube holds (:mod:`analysis.contents`); a cube still
    being filled is reported over its done steps, and says how many are done. ``reference``
    (e.g. the exact replay of the same run) adds the comparison table and the occupation
    figures of every grouping both cubes hold. ``extra_tables``: ``(title, (headers, rows))``
    shown after the other tables. Returns the path of ``index.html``.
    """
    out = Path(out)
    previous = _owned_files(out)  # refuse before computing or writing anything
    all_steps = int(cube.sizes["step"])
    cube = _prepare(cube)
    ref = _prepare(reference) if reference is not None else None
    cmp = compare(cube, ref) if ref is not None else None
    figures, omitted = plan(cube, ref)
    files = {f"fig-{s.stem}.png" for s in figures} | {"index.html", "summary.md"}
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, files | previous)  # a crash part-way still leaves an owned folder
    for spec in figures:
        _render(spec, out / f"fig-{spec.stem}.png")

    prov = provenance(cube)
    traj, task = prov["trajectory"], prov["task"]
    steps = cube["step"].values
    done = int(steps.size)
    context = {
        "title": f"LCA report: {cube_path or traj.get('path', 'cube')}",
        "notice": partial_sentence(done, all_steps),
        "provenance": [
            ("cube", cube_path or "(in memory)"),
            ("trajectory", f"{traj.get('path', '?')} (manifest sha256 "
                           f"{traj.get('manifest_sha256', traj.get('sha256', '?'))})"),
            ("task", f"{task.get('ref') or task.get('reference') or task.get('value', '?')} "
                     f"{json.dumps(task.get('args', {}))}"),
            ("quadrature", f"{prov['quadrature']} (tolerance {prov['tolerance']})"),
            ("gradient", gradient_text(prov["gradient"])),
            ("steps", f"{steps.min()}..{int(cube['step_end'].values.max())}: "
                      f"{done} of {all_steps} intervals done"),
            ("groupings", ", ".join(groupings(cube))),
            ("lca-replay", f"{prov['version']}, cube created {prov['created']}"),
        ] + ([("reference", f"{reference_path or '(in memory)'}: {describe(ref)}")]
             if ref is not None else []),
        "findings": findings(cube, cmp, all_steps=all_steps),
        "tables": _tables(cube, cmp) + list(extra_tables),
        "figures": figures,
        "omitted": omitted,
    }
    (out / "summary.md").write_text(markdown(context), encoding="utf-8")
    (out / "index.html").write_text(page(context), encoding="utf-8")
    for stale in previous - files:
        (out / stale).unlink(missing_ok=True)
    _write_manifest(out, files)
    return out / "index.html"
