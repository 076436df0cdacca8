"""docs/tutorial.ipynb runs on a real Jupyter kernel (nbclient + ipykernel) and shows what its
text says: the test recomputes each number it prints from the cubes the notebook wrote."""

from __future__ import annotations

import base64
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest

import analysis
import replay

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"


def test_the_tutorial_is_stored_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def _cell(nb, marker: str):
    found = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    assert len(found) == 1, marker
    return found[0]


def _text(cell, kind: str = "stream") -> str:
    out = []
    for o in cell.outputs:
        if kind == "stream" and o.output_type == "stream":
            assert o.name == "stdout", o.text  # no warning, no progress bar on stderr
            out.append(o.text)
        elif kind == "result" and o.output_type == "execute_result":
            out.append(o.data["text/plain"])
    return "".join(out)


def _number(text: str, label: str) -> float:
    m = re.search(rf"{re.escape(label)}\s*(-?[\d.]+(?:e-?\d+)?)", text)
    assert m, (label, text)
    return float(m.group(1))


def _png_size(cell) -> tuple[int, int]:
    images = [o for o in cell.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 1, cell.source
    raw = base64.b64decode(images[0].data["image/png"])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", raw[16:24])


@pytest.mark.slow
def test_the_tutorial_runs_on_a_kernel_and_shows_what_it_says(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    root = str(NOTEBOOK.parents[1])  # the kernel imports this checkout's replay and analysis
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    cleanup = _cell(nb, "shutil.rmtree(workdir)")
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell is not cleanup:
                client.execute_cell(cell, i)
        workdir = Path(re.search(r"workdir: (\S+)", _text(_cell(nb, "tempfile.mkdtemp"))).group(1))
        assert workdir.is_dir() and not workdir.is_relative_to(NOTEBOOK.parents[1])
        _check(nb, workdir)
        client.execute_cell(cleanup, nb.cells.index(cleanup))
    assert not workdir.exists()  # the notebook leaves nothing behind


def _check(nb, workdir: Path) -> None:
    exact = analysis.open_cube(workdir / "exact.zarr")
    sampled = analysis.open_cube(workdir / "sampled.zarr")
    assert bool(exact["done"].all()) and exact.sizes["step"] == 20

    assert "dask.array" in _text(_cell(nb, "print(type(cube"))  # opened lazily
    assert _text(_cell(nb, "cube.lca.groupings"), "result") == "['tensor', 'layer']"
    assert _text(_cell(nb, 'layers = cube.lca.grouping("layer")')).startswith(
        "['0', '2', '4'] [144, 272, 68]")  # the Sequential's Linear layers and their sizes

    sums = _text(_cell(nb, "early + late == total"))
    layer_lca = float(exact["lca"].sel(group=["layer/0", "layer/2", "layer/4"],
                                       dataset="train").sum())
    change = float(exact["loss_next"].sel(dataset="train")[-1] - exact["loss"].sel(
        dataset="train")[0])
    assert _number(sums, "sum of LCA over layers:") == pytest.approx(layer_lca, abs=1e-6)
    assert _number(sums, "measured loss change:") == pytest.approx(change, abs=1e-6)
    assert abs(layer_lca - change) < 1e-3 * abs(change)  # the gradient theorem
    assert "early + late == total:  True" in sums

    shares = _text(_cell(nb, "LCA per parameter:"))
    per = exact.lca.grouping("layer").lca.total().lca.per_param().sel(dataset="train").values
    printed = [float(v) for v in re.findall(r"'\d': (-?[\d.e-]+)", shares)]
    np.testing.assert_allclose(printed, per, atol=1e-6)

    tau = analysis.compare(sampled, exact)["tau"].sel(grouping_name="tensor", dataset="train")
    assert _number(_text(_cell(nb, "Kendall's tau (tensor")), "train):") == pytest.approx(
        float(tau), abs=1e-4)

    for marker in ("plot.layer_stacks()", 'plot.groups("tensor"', "plot.lines("):
        w, h = _png_size(_cell(nb, marker))
        assert w > 300 and h > 200, marker

    params = _text(_cell(nb, "replay.load_param_lca"))
    w = replay.load_param_lca(str(workdir / "exact.zarr"))["train"]["0.weight"]
    assert _number(params, "sum over elements:") == pytest.approx(float(w.sum()), abs=1e-8)
    group = float(exact["lca"].sel(group="tensor/0.weight", dataset="train").sum())
    assert _number(params, "tensor group total:") == pytest.approx(group, abs=1e-8)
    assert f"most helpful element: {divmod(int(w.argmin()), w.shape[1])}" in params

    listed = _text(_cell(nb, "analysis.write_report"), "result")
    pngs = sorted(p.name for p in (workdir / "report").glob("*.png"))
    assert re.findall(r"'([^']+)'", listed) == pngs
    assert {"fig-layers-stacks.png", "fig-occupation-tensor.png"} <= set(pngs)
