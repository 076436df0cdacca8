"""``write_report``: figures as PNGs, an offline ``index.html`` and ``summary.md`` in one folder.

The folder must be new, empty, or a folder a previous report wrote: the report keeps a list of
the files it wrote in ``.lca-report.json`` and refuses a folder holding anything else, so it
never overwrites user data. Files of a previous report that this one does not write again
(a figure now omitted) are removed, so the folder always matches its ``index.html``.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import xarray as xr

from analysis import diagnostics, figures
from analysis.compare import compare
from analysis.cube import describe, gradient_text, provenance
from analysis.findings import (Table, comparison_table, findings, main_grouping,
                               reconstruction_table, top_groups_table)
from analysis.ops import groupings, select_done
from replay.errors import LCAError

MANIFEST = ".lca-report.json"
LOAD_LIMIT = 1 << 30  # cubes below 1 GiB are read into memory once instead of per figure


@dataclass(frozen=True)
class FigureSpec:
    stem: str
    draw: Callable
    title: str
    caption: str
    grouping: str | None = None
    needs_reference: bool = False
    size: tuple[float, float] = (7.5, 4.2)


FIGURES = (
    FigureSpec("loss", diagnostics.fig_loss, "Loss and its reconstruction",
               "Measured loss (solid) and loss[0] + cumulative Σ LCA (dashed) per dataset."),
    FigureSpec("residual", diagnostics.fig_residual, "Residual per step",
               "ΔL − Σ LCA per interval: the quadrature error of the path integral."),
    FigureSpec("helped", diagnostics.fig_helped, "Parameters that helped",
               "Share of parameters with LCA < 0 in each interval."),
    FigureSpec("occupation", figures.fig_occupation, "Occupation ratio, this run vs reference",
               "Share of the total LCA per module in both runs; τ = Kendall's rank correlation "
               "(Zhu et al. Fig. 1).", "transformer", needs_reference=True),
    FigureSpec("sparse-dense", figures.fig_sparse_dense, "Sparse and dense weights",
               "Cumulative LCA per parameter of embeddings/softmax vs dense layers "
               "(Zhu et al. Fig. 2).", "sparse-dense"),
    FigureSpec("layers", figures.fig_layers, "Layer-wise cumulative LCA",
               "Cumulative LCA per parameter of each encoder and decoder layer "
               "(Zhu et al. Fig. 3).", "transformer"),
    FigureSpec("intervals", figures.fig_intervals, "Interval LCA along training",
               "Per-module LCA per parameter averaged over windows of steps (Zhu et al. Eq. 3, "
               "Fig. 4).", "transformer", size=(9.0, 4.6)),
    FigureSpec("frequency", figures.fig_frequency, "Embeddings by word frequency",
               "Cumulative LCA per parameter of embedding rows by frequency bucket "
               "(Zhu et al. Fig. 5).", "frequency"),
)


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


def _render(spec: FigureSpec, cube, reference, path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no display

    fig = Figure(figsize=spec.size, layout="constrained")
    ax = fig.subplots()
    if spec.needs_reference:
        spec.draw(cube, reference, ax=ax)
    else:
        spec.draw(cube, ax=ax)
    fig.savefig(path, dpi=110)


def write_report(cube: xr.Dataset, out: str | os.PathLike, reference: xr.Dataset | None = None,
                 *, cube_path: str | None = None, reference_path: str | None = None,
                 extra_tables: Sequence[tuple[str, Table]] = ()) -> Path:
    """Write figures, ``index.html`` and ``summary.md`` for ``cube`` into folder ``out``.

    ``reference`` (e.g. the exact replay of the same run) adds the comparison table and the
    occupation figure. ``extra_tables``: (title, (headers, rows)) pairs rendered after the
    other tables (e.g. ``lca paper``'s findings). Returns the path of ``index.html``.
    """
    out = Path(out)
    previous = _owned_files(out)  # refuse before computing or writing anything
    all_steps = int(cube.sizes["step"])
    cube = _prepare(cube)
    ref = _prepare(reference) if reference is not None else None
    cmp = compare(cube, ref) if ref is not None else None
    have = groupings(cube)

    plan, omitted = [], []
    for spec in FIGURES:
        if spec.needs_reference and ref is None:
            omitted.append((spec, "needs a reference cube (--compare OTHER)"))
        elif spec.grouping and spec.grouping not in have:
            omitted.append((spec, f"the cube has no {spec.grouping!r} grouping"))
        elif spec.needs_reference and spec.grouping and spec.grouping not in groupings(ref):
            omitted.append((spec, f"the reference has no {spec.grouping!r} grouping"))
        else:
            plan.append(spec)
    files = {f"fig-{s.stem}.png" for s in plan} | {"index.html", "summary.md"}
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, files | previous)  # a crash part-way still leaves an owned folder
    for spec in plan:
        _render(spec, cube, ref, out / f"fig-{spec.stem}.png")

    prov = provenance(cube)
    traj, task = prov["trajectory"], prov["task"]
    steps = cube["step"].values
    context = {
        "title": f"LCA report: {cube_path or traj.get('path', 'cube')}",
        "provenance": [
            ("cube", cube_path or "(in memory)"),
            ("trajectory", f"{traj.get('path', '?')} (manifest sha256 "
                           f"{traj.get('manifest_sha256', traj.get('sha256', '?'))})"),
            ("task", f"{task.get('ref') or task.get('reference') or task.get('value', '?')} "
                     f"{json.dumps(task.get('args', {}))}"),
            ("quadrature", f"{prov['quadrature']} (tolerance {prov['tolerance']})"),
            ("gradient", gradient_text(prov["gradient"])),
            ("steps", f"{steps.min()}..{int(cube['step_end'].values.max())}: "
                      f"{steps.size} of {all_steps} intervals done"),
            ("groupings", ", ".join(have)),
            ("lca-replay", f"{prov['version']}, cube created {prov['created']}"),
        ] + ([("reference", f"{reference_path or '(in memory)'}: {describe(ref)}")]
             if ref is not None else []),
        "findings": findings(cube, cmp),
        "tables": [("Loss reconstruction", reconstruction_table(cube)),
                   (f"Top contributing groups ({main_grouping(cube)} grouping)",
                    top_groups_table(cube, main_grouping(cube)))]
                  + ([("Comparison with the reference", comparison_table(cmp))]
                     if cmp is not None else []) + list(extra_tables),
        "figures": plan,
        "omitted": omitted,
    }
    (out / "summary.md").write_text(_markdown(context), encoding="utf-8")
    (out / "index.html").write_text(_html(context), encoding="utf-8")
    for stale in previous - files:
        (out / stale).unlink(missing_ok=True)
    _write_manifest(out, files)
    return out / "index.html"


def _md_table(table: Table) -> str:
    headers, rows = table
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |",
             "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(c: dict) -> str:
    parts = [f"# {c['title']}", "", "## Run", ""]
    parts += [f"- **{k}**: {v}" for k, v in c["provenance"]]
    parts += ["", "## Findings", ""] + [f"- {s}" for s in c["findings"]]
    for title, table in c["tables"]:
        parts += ["", f"## {title}", "", _md_table(table)]
    parts += ["", "## Figures", ""]
    for spec in c["figures"]:
        parts += [f"### {spec.title}", "", f"![{spec.title}](fig-{spec.stem}.png)", "",
                  spec.caption, ""]
    parts += [f"- *{spec.title}* omitted: {why}." for spec, why in c["omitted"]]
    parts += ["", "LCA sign convention: negative = the parameters lowered the loss (helped)."]
    return "\n".join(parts) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #bbb;
padding:.25em .6em;text-align:right}th{background:#eee}td:first-child,th:first-child{text-align:
left}figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}figcaption{color:#555}
dt{font-weight:bold;float:left;clear:left;width:8em}dd{margin-left:9em}"""


def _html_table(table: Table) -> str:
    headers, rows = table
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(c: dict) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(c['title'])}</title><style>{CSS}</style></head><body>",
             f"<h1>{e(c['title'])}</h1>", "<h2>Run</h2><dl>"]
    parts += [f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in c["provenance"]]
    parts += ["</dl><h2>Findings</h2><ul>"] + [f"<li>{e(s)}</li>" for s in c["findings"]]
    parts.append("</ul>")
    for title, table in c["tables"]:
        parts += [f"<h2>{e(title)}</h2>", _html_table(table)]
    parts.append("<h2>Figures</h2>")
    for spec in c["figures"]:
        parts.append(f'<figure><img src="fig-{e(spec.stem)}.png" alt="{e(spec.title)}">'
                     f"<figcaption><b>{e(spec.title)}.</b> {e(spec.caption)}</figcaption>"
                     "</figure>")
    if c["omitted"]:
        parts.append("<ul>" + "".join(f"<li><i>{e(s.title)}</i> omitted: {e(why)}.</li>"
                                      for s, why in c["omitted"]) + "</ul>")
    parts.append("<p>LCA sign convention: negative = the parameters lowered the loss "
                 "(helped).</p></body></html>")
    return "\n".join(parts) + "\n"
