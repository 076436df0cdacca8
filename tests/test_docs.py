"""The documentation: the site builds under --strict, the README stays short and true to the
benchmarks page, every relative link resolves, and the API reference covers the public API."""

from __future__ import annotations

import ast
import html
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

import replay

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
# A number as written in the docs, with its unit if it has one: 0.938, 1.91x, +5.1%, 1e8,
# 106,560, 2.13.0, 36 s, 15.2 min.
NUMBER = re.compile(r"[+−-]?\d+(?:[.,]\d+)*(?:e[+-]?\d+)?"
                    r"(?:x|×|\s?%|\s(?:min|ms|s|GB/s|GiB|MiB|MB|KiB|bytes)(?![\w/]))?")


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where links are not links."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's toc (and GitHub) give a heading."""
    text = re.sub(r"<[^>]+>|`", "", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^(```|~~~).*?^\1", "", path.read_text(), flags=re.M | re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def _section(text: str, title: str) -> str:
    """The text of the ``## title`` section of a Markdown document (up to the next ``## ``)."""
    m = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no '## {title}' section"
    return m.group(1)


def _numbers(text: str) -> set[str]:
    """The numbers of ``text`` (dates left out), signs of negatives dropped, spaces normalised."""
    return {re.sub(r"\s+", " ", n.lstrip("−-")) for n in NUMBER.findall(DATE.sub(" ", text))}


# --------------------------------------------------------------------------------- the site

@pytest.mark.slow
def test_site_builds_with_strict_and_renders_the_api_reference(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module)
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # mkdocs' own warnings (``WARNING -  ...``); the notebook's kernel may log its own.
    warnings = [line for line in proc.stderr.splitlines() if re.match(r"WARNING\s+-", line)]
    assert not warnings, proc.stderr
    for page in ("index.html", "design/index.html", "benchmarks/index.html",
                 "changelog/index.html", "api/index.html"):
        assert (site / page).is_file(), page
    # The reference is generated from the docstrings (not an empty page).
    engine = (site / "api/engine/index.html").read_text()
    assert 'id="replay.engine.driver.run"' in engine
    driver = ast.parse((ROOT / "replay" / "engine" / "driver.py").read_text())
    run = next(n for n in driver.body if isinstance(n, ast.FunctionDef) and n.name == "run")
    summary = ast.get_docstring(run).splitlines()[0].replace("``", "")
    assert summary in html.unescape(re.sub(r"<[^>]+>", "", engine)), summary
    # The changelog page is CHANGELOG.md itself.
    assert replay.__version__ in (site / "changelog/index.html").read_text()


def test_mkdocs_config_is_strict_and_ci_builds_the_docs():
    config = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^strict: true$", config, re.M)
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^docs: setup\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe and "mkdocs build --strict" in recipe.group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("make docs </dev/null") > ci.index("make test </dev/null")
    # Its status reaches the script's exit status.
    assert "make docs </dev/null || docs_rc=$?" in ci and "rc=$docs_rc" in ci


# ------------------------------------------------------------------------------- the README

def test_readme_is_short_and_shows_the_two_commands_first():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"
    head = lines[:20]
    assert any(re.match(r"make demo\b", line) for line in head), head
    assert any(re.match(r"make test\b", line) for line in head), head


def test_readme_results_table_is_in_the_benchmarks_page_with_its_date():
    results = _section(README.read_text(), "Results")
    dates = set(DATE.findall(results))
    assert len(dates) == 1, f"the README's results must name the one date they were measured: {dates}"
    date = dates.pop()
    bench = (DOCS / "benchmarks.md").read_text()
    # The benchmarks page has a section of that date's results, holding every number.
    dated = _numbers(_section(bench, f"Results of {date}"))
    rows = [line for line in results.splitlines() if line.startswith("|")][2:]
    assert len(rows) >= 5, "the README's results table is missing"
    for row in rows:
        for number in _numbers(row):
            assert number in dated, f"README result {number!r} ({row}) is not in " \
                                    f"docs/benchmarks.md's results of {date}"


def test_dated_statements_of_the_readme_are_in_the_benchmarks_page():
    bench_text = (DOCS / "benchmarks.md").read_text()
    bench = _numbers(bench_text)
    text = re.sub(r"^```.*?^```", "", README.read_text(), flags=re.M | re.S)
    dated = [p for p in re.split(r"\n\s*\n", text) if DATE.search(p)]
    assert dated
    for paragraph in dated:
        for date in DATE.findall(paragraph):
            assert date in bench_text, f"{date} ({paragraph[:60]}…) is not in docs/benchmarks.md"
        for number in _numbers(paragraph):
            assert number in bench, f"{number!r} ({paragraph[:60]}…) is not in docs/benchmarks.md"


# -------------------------------------------------------------------------------- the links

def test_every_relative_link_points_to_a_file_that_exists():
    broken = []
    for path in _markdown_files():
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)",
                                 _prose(path.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto: …
                continue
            rel, _, anchor = target.partition("#")
            dest = (path.parent / rel).resolve() if rel else path
            where = f"{path.relative_to(ROOT)}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where} (no heading with that anchor)")
    assert not broken, "\n".join(broken)


# ------------------------------------------------------------------------ the API reference

def _api_pages() -> str:
    return "\n".join(p.read_text() for p in sorted((DOCS / "api").glob("*.md")))


def _analysis_api() -> dict[str, str]:
    """analysis's public names and their defining modules, read from its __init__ (no import)."""
    tree = ast.parse((ROOT / "analysis" / "__init__.py").read_text())
    where: dict[str, str] = {}
    assigned = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("analysis"):
            where.update({a.name: node.module for a in node.names})
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            assigned[node.targets[0].id] = node.value
    lazy = ast.literal_eval(assigned["_LAZY"])
    where.update(lazy)
    public = []
    for element in assigned["__all__"].elts:   # names, and *_LAZY
        public += list(lazy) if isinstance(element, ast.Starred) else [element.value]
    return {name: where[name] for name in public}


def test_public_api_page_links_every_public_name_to_where_it_is_defined():
    page = (DOCS / "api" / "index.md").read_text()
    api = {**{k: v for k, v in replay._API.items()}, **_analysis_api()}
    assert "run" in api and "open_cube" in api
    missing = [f"[{name}][{module}.{name}]" for name, module in sorted(api.items())
               if f"[{name}][{module}.{name}]" not in page]
    assert not missing, "docs/api/index.md lacks " + ", ".join(missing)


def test_every_subpackage_and_top_level_module_has_an_api_page():
    pages = _api_pages()
    wanted = ["replay", "analysis"]
    wanted += [f"replay.{p.name}" for p in sorted((ROOT / "replay").iterdir())
               if (p / "__init__.py").is_file()]
    wanted += [f"replay.{p.stem}" for p in sorted((ROOT / "replay").glob("*.py"))
               if p.stem != "__init__"]
    missing = [m for m in wanted if not re.search(rf"^::: {re.escape(m)}$", pages, re.M)]
    assert not missing, "no API page renders " + ", ".join(missing) + \
        ": add a '::: MODULE' line to a page under docs/api/ (and the page to mkdocs.yml's nav)"


# --------------------------------------------------------------------- design and changelog

def test_design_document_keeps_its_section_numbers():
    # Docstrings cite "docs/design.md §N": the numbers must keep pointing at the same topics.
    topics = ["Flow", "Trajectory store", "Recorder", "Task", "The mathematics", "Groups",
              "The cube", "Execution", "Analysis", "Integrations"]
    headings = re.findall(r"^## (\d+)\. (.+)$", (DOCS / "design.md").read_text(), re.M)
    assert [int(n) for n, _ in headings] == list(range(1, 11))
    for (n, title), topic in zip(headings, topics):
        assert title.startswith(topic), f"§{n} is '{title}', expected '{topic}…'"


def test_changelog_is_in_the_site_and_covers_this_version():
    assert (DOCS / "changelog.md").read_text().strip() == '--8<-- "CHANGELOG.md"'
    changelog = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## (\S+)", changelog, re.M)
    assert versions[0] in ("Unreleased", replay.__version__)  # the newest section first
    assert replay.__version__ in versions, f"CHANGELOG.md has no section for {replay.__version__}"
