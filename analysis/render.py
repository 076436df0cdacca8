"""The report's text: ``summary.md`` and an offline ``index.html`` (no script, no remote URL).

Both are rendered from one context dict: ``title``, ``notice`` (a sentence shown first, or
None), ``provenance`` [(key, value)], ``findings`` [str], ``tables`` [(title, Table)],
``figures`` [:class:`analysis.contents.Planned`] and ``omitted`` [(title, reason)].
"""

from __future__ import annotations

import html
import re

from analysis.findings import Table

SIGN = "LCA sign convention: negative = the parameters lowered the loss (helped)."


def _sections(figures) -> list[tuple[str, list]]:
    out: list[tuple[str, list]] = []
    for spec in figures:
        if not out or out[-1][0] != spec.section:
            out.append((spec.section, []))
        out[-1][1].append(spec)
    return out


def _anchor(text: str) -> str:
    return "sec-" + (re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x")


def _md_table(table: Table) -> str:
    headers, rows = table
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |",
             "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(c: dict) -> str:
    parts = [f"# {c['title']}", ""]
    if c.get("notice"):
        parts += [f"> **{c['notice']}**", ""]
    parts += ["## Run", ""] + [f"- **{k}**: {v}" for k, v in c["provenance"]]
    parts += ["", "## Findings", ""] + [f"- {s}" for s in c["findings"]]
    for title, table in c["tables"]:
        parts += ["", f"## {title}", "", _md_table(table)]
    for section, specs in _sections(c["figures"]):
        parts += ["", f"## Figures: {section}", ""]
        for spec in specs:
            parts += [f"### {spec.title}", "", f"![{spec.title}](fig-{spec.stem}.png)", "",
                      spec.caption, ""]
    if c["omitted"]:
        parts += ["", "Not drawn:", ""]
        parts += [f"- *{title}* omitted: {why}." for title, why in c["omitted"]]
    parts += ["", SIGN]
    return "\n".join(parts) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:72em;margin:2em auto;padding:0 1em;
color:#222;line-height:1.4}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px
solid #bbb;padding:.25em .6em;text-align:right}th{background:#eee}td:nth-child(-n+2),
th:nth-child(-n+2){text-align:left}figure{margin:1.5em 0}img{max-width:100%;height:auto;
border:1px solid #ddd}figcaption{color:#555;max-width:60em}dt{font-weight:bold;float:left;
clear:left;width:8em}dd{margin-left:9em}nav ul{columns:2;margin:.3em 0 1em}.notice{background:
#fff4d6;border-left:4px solid #E69F00;padding:.6em 1em}h3{margin-bottom:.3em}"""


def _html_table(table: Table) -> str:
    headers, rows = table
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(c: dict) -> str:
    e = html.escape
    sections = _sections(c["figures"])
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(c['title'])}</title><style>{CSS}</style></head><body>",
             f"<h1>{e(c['title'])}</h1>"]
    if c.get("notice"):
        parts.append(f'<p class="notice"><b>{e(c["notice"])}</b></p>')
    toc = ["Run", "Findings"] + [t for t, _ in c["tables"]] + [f"Figures: {s}" for s, _ in sections]
    parts.append("<nav><ul>" + "".join(f'<li><a href="#{_anchor(t)}">{e(t)}</a></li>'
                                       for t in toc) + "</ul></nav>")
    parts += [f'<h2 id="{_anchor("Run")}">Run</h2><dl>']
    parts += [f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in c["provenance"]]
    parts += [f'</dl><h2 id="{_anchor("Findings")}">Findings</h2><ul>']
    parts += [f"<li>{e(s)}</li>" for s in c["findings"]] + ["</ul>"]
    for title, table in c["tables"]:
        parts += [f'<h2 id="{_anchor(title)}">{e(title)}</h2>', _html_table(table)]
    for section, specs in sections:
        parts.append(f'<h2 id="{_anchor("Figures: " + section)}">Figures: {e(section)}</h2>')
        for spec in specs:
            parts.append(f'<figure><h3>{e(spec.title)}</h3><img src="fig-{e(spec.stem)}.png" '
                         f'alt="{e(spec.title)}"><figcaption>{e(spec.caption)}</figcaption>'
                         "</figure>")
    if c["omitted"]:
        parts.append("<p>Not drawn:</p><ul>" + "".join(
            f"<li><i>{e(t)}</i> omitted: {e(why)}.</li>" for t, why in c["omitted"]) + "</ul>")
    parts.append(f"<p>{e(SIGN)}</p></body></html>")
    return "\n".join(parts) + "\n"
