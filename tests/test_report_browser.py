"""The report in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright
without a browser download) loads ``index.html`` from disk, shows every figure and fetches
nothing from anywhere but the report folder.

Skipped when Chromium or Playwright is missing, except under ``CI=true``, where it fails:
``.ci/run`` installs ``chromium`` and ``make test`` the ``report-check`` extra.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import analysis
from tests.helpers_analysis import figure_files

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("LCA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _need(problem: str | None) -> None:
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the browser test needs {problem} under CI=true", pytrace=False)
    pytest.skip(problem)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("playwright (pip install -e '.[report-check]')")
    _need(None if Path(CHROMIUM).is_file() else f"Chromium at {CHROMIUM} (apt install chromium)")
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def report(make_cube, tmp_path_factory):
    """A report with every kind of figure: all groupings, a reference, a partial cube."""
    out = tmp_path_factory.mktemp("browser") / "report"
    cube = make_cube(steps=14, not_done=[13])
    reference = make_cube(steps=14, seed=2, mode="sampled")
    analysis.write_report(cube, out, reference)
    return out


def test_index_shows_every_figure_and_fetches_nothing_else(browser, report, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    failed = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    index = (report / "index.html").resolve()
    page.goto(index.as_uri(), wait_until="load")
    images = page.evaluate("""() => Array.from(document.images).map(
        i => ({src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth,
               height: i.naturalHeight, shown: i.getBoundingClientRect().width}))""")
    assert [i["src"] for i in images] == figure_files(report)
    assert len(images) >= 15
    for img in images:
        assert img["complete"] and img["width"] > 300 and img["height"] > 200, img
        assert 0 < img["shown"] <= 1280, img  # scaled to the page, not wider than it
    folder = report.resolve().as_uri() + "/"
    assert requests and all(url.startswith(folder) for url in requests), requests
    assert sorted(requests) == sorted([index.as_uri()] + [folder + i["src"] for i in images])
    assert failed == []
    text = page.inner_text("body")
    assert "Partial cube: 13 of 14 intervals are done" in text
    for anchor in page.eval_on_selector_all("nav a", "els => els.map(e => e.hash)"):
        assert page.locator(anchor).count() == 1, anchor  # every contents link has a target
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    page.close()
