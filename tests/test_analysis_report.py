"""`lca report` and `lca export`: the report folder is self-contained; export round-trips."""

import json
import re

import numpy as np
import pytest
import xarray as xr

import analysis
from replay.cli import main
from replay.errors import LCAError


@pytest.fixture(scope="module")
def paths(make_cube, save_cube, tmp_path_factory):
    root = tmp_path_factory.mktemp("cubes")
    exact = save_cube(make_cube(steps=10), root / "exact.zarr")
    sampled = save_cube(make_cube(steps=10, seed=4, mode="sampled"), root / "sampled.zarr")
    return {"exact": exact, "sampled": sampled}


@pytest.fixture(scope="module")
def report(paths, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    assert main(["report", paths["sampled"], "--compare", paths["exact"], "-o", str(out)]) == 0
    return out


def test_html_references_only_files_in_the_folder(report):
    page = (report / "index.html").read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page, flags=re.I)
    assert refs, "index.html shows no figure"
    ids = set(re.findall(r'\bid="([^"]+)"', page))
    files = []
    for ref in refs:
        if ref.startswith("#"):  # the contents: a link to a heading of this page
            assert ref[1:] in ids, ref
            continue
        assert "/" not in ref and ":" not in ref and not ref.startswith(".."), ref
        assert (report / ref).is_file(), ref
        files.append(ref)
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    pngs = {p.name for p in report.glob("*.png")}
    assert pngs == set(files)
    per_grouping = {f"fig-{kind}-{g}.png" for g in ("transformer", "sparse-dense", "frequency",
                                                   "layer", "tensor")
                    for kind in ("intervals", "occupation")}
    cumulative = {f"fig-groups-{g}.png" for g in ("transformer", "sparse-dense", "tensor")}
    assert pngs == {"fig-loss.png", "fig-residual.png", "fig-helped.png", "fig-layers-stacks.png",
                    "fig-layers-transformer.png", "fig-frequency-frequency.png"} \
        | per_grouping | cumulative


def test_summary_has_provenance_findings_and_comparison(report, paths):
    md = (report / "summary.md").read_text()
    for text in ("runs/toy/trajectory", "replay.tasks.toy_nmt:ToyNMT", "simpson",
                 "sampled (batches=4, batch_size=32, seed=0)", "relative error",
                 "## Comparison with the reference", "Kendall's τ", "sign agreement",
                 paths["exact"]):
        assert text in md, text
    assert re.search(r"transformer group \w+ contributed most: \d+% of the loss decrease on "
                     r"train", md)
    assert "max \\|residual\\|" in md  # pipes in a cell are escaped for the table


def test_report_refuses_a_folder_with_user_files(paths, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(LCAError, match=r"report folder .*mine holds files a report did not "
                                       r"write \(notes.txt\): give a new or empty folder"):
        analysis.write_report(analysis.open_cube(paths["exact"]), out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_report_rewrites_its_own_folder_and_drops_stale_figures(paths, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", paths["sampled"], "--compare", paths["exact"], "-o", str(out)]) == 0
    assert (out / "fig-occupation-tensor.png").exists()
    assert main(["report", paths["sampled"], "-o", str(out)]) == 0  # no reference this time
    assert not list(out.glob("fig-occupation-*.png"))
    owned = json.loads((out / ".lca-report.json").read_text())["files"]
    assert sorted(owned) == sorted(p.name for p in out.iterdir() if p.name[0] != ".")
    assert "omitted: needs a reference cube (--compare OTHER)" in (out / "summary.md").read_text()
    assert "wrote" in capsys.readouterr().out


def test_report_notes_figures_whose_grouping_is_absent(make_cube, tmp_path):
    cube = make_cube(steps=4, groupings=("tensor", "transformer"))
    analysis.write_report(cube, tmp_path / "r")
    md = (tmp_path / "r" / "summary.md").read_text()
    assert "*Zhu et al. figures of the 'frequency' grouping* omitted: the cube has no " \
           "'frequency' grouping" in md
    assert "*Zhu et al. figures of the 'sparse-dense' grouping* omitted: the cube has no " \
           "'sparse-dense' grouping" in md
    assert not list((tmp_path / "r").glob("fig-frequency*.png"))


def test_cli_report_error_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.zarr"), "-o", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"lca report: error: cube {tmp_path / 'none.zarr'} does not exist: give the " \
                  "directory `lca replay` wrote"
    assert not (tmp_path / "r").exists()


def test_export_round_trips(make_cube, save_cube, tmp_path):
    cube = make_cube(steps=5, not_done=[4])
    path = save_cube(cube, tmp_path / "c.zarr")
    out = tmp_path / "c.nc"
    assert main(["export", path, str(out)]) == 0
    back = xr.open_dataset(out)
    try:
        assert back["group"].values.tolist() == cube["group"].values.tolist()
        assert back["done"].dtype == bool
        assert back.attrs == cube.attrs
        for name in ("lca", "helped", "loss", "loss_next", "residual", "done", "splits"):
            np.testing.assert_array_equal(back[name].values, cube[name].values)
        xr.testing.assert_allclose(back.lca.total(), cube.lca.total())
    finally:
        back.close()


def test_export_refuses_to_overwrite_without_force(make_cube, save_cube, tmp_path, capsys):
    path = save_cube(make_cube(steps=2), tmp_path / "c.zarr")
    out = tmp_path / "c.nc"
    out.write_text("keep me")
    assert main(["export", path, str(out)]) == 1
    assert f"{out} already exists: choose another name or pass --force" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main(["export", path, str(out), "--force"]) == 0
    assert xr.open_dataset(out).sizes["step"] == 2
    assert not list(tmp_path.glob("*.partial"))


def test_report_on_a_partial_cube_uses_done_steps(make_cube, tmp_path):
    cube = make_cube(steps=6, not_done=[4, 5])
    analysis.write_report(cube, tmp_path / "r")
    md = (tmp_path / "r" / "summary.md").read_text()
    assert "0..4: 4 of 6 intervals done" in md
    assert "nan" not in md.lower()


def test_report_refuses_a_cube_with_no_done_step(make_cube, tmp_path):
    with pytest.raises(LCAError, match=r"cube has no done steps \(0 of 2\)"):
        analysis.write_report(make_cube(steps=2, not_done=[0, 1]), tmp_path / "r")
