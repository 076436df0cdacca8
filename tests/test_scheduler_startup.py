"""Starting the default scheduler (``local``: a Dask LocalCluster whose workers multiprocessing
spawns) from wherever users call ``replay.run``: a plain script without a main guard, a guarded
script, a Jupyter kernel; and Dask start-up failures as one-line errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import analysis
import replay
from replay.errors import ReplayError
from replay.tasks.tiny_mlp import TinyMLP
from tests.helpers_analysis import record

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# A user's own model and task, defined in the script itself, trained and replayed in one go, as
# a first script is written (the Task class lives in __main__: the workers get it by value).
BODY = '''\
import torch
from torch import nn

import replay

print("training starts", flush=True)


class BlobTask:
    def build_model(self):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    def datasets(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 4, generator=g)
        return {"train": [(x[i], int(x[i, 0] > 0)) for i in range(32)]}

    def collate(self, items):
        return torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="sum"), y.numel()


task = BlobTask()
model = task.build_model()
opt = torch.optim.SGD(model.parameters(), lr=0.5)
batch = task.collate(task.datasets()["train"])
with replay.Recorder(model, "run/trajectory") as rec:
    for step in range(3):
        loss, n = task.loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        rec.step(loss=loss.item() / n)
cube = replay.run("run/trajectory", task=task, out="run/cube.zarr")
print("replay done", int(cube["done"].sum()), flush=True)
'''


def _script(guarded: bool) -> str:
    if not guarded:
        return BODY
    imports, _, rest = BODY.partition('print("training starts"')
    return (imports + "\n\ndef main():\n" + textwrap.indent('print("training starts"' + rest, "    ")
            + '\n\nif __name__ == "__main__":\n    main()\n')


@pytest.mark.parametrize("guarded", [False, True], ids=["no-main-guard", "main-guard"])
def test_a_script_trains_once_and_replays_with_the_default_scheduler(tmp_path, guarded):
    (tmp_path / "train.py").write_text(_script(guarded))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("training starts") == 1, proc.stdout  # not re-run in a worker
    assert "replay done 3" in proc.stdout
    assert "LocalCluster (" in proc.stderr  # the default scheduler did run the replay
    cube = analysis.open_cube(tmp_path / "run" / "cube.zarr")
    assert bool(cube["done"].all())
    assert float(analysis.relative_error(cube).sel(dataset="train")) < 1e-3


def test_a_jupyter_kernel_replays_with_local_workers(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    cells = [BODY.replace('out="run/cube.zarr")', 'out="run/cube.zarr", scheduler="local:1")')
             .replace('"run/', f'"{tmp_path}/run/')]
    assert 'scheduler="local:1"' in cells[0]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs if o["output_type"] == "stream")
    assert "training starts" in text and "replay done 3" in text
    assert "LocalCluster (1 worker processes)" in text


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    return record(TinyMLP(train_size=32, test_size=16),
                  tmp_path_factory.mktemp("startup") / "traj", steps=2)


def test_a_local_cluster_that_cannot_start_is_one_line(trajectory, tmp_path):
    import dask
    import distributed  # noqa: F401  (its config defaults first, then the override)

    out = tmp_path / "cube.zarr"
    with dask.config.set({"distributed.worker.preload": ["lca_test_no_such_preload"]}):
        with pytest.raises(ReplayError, match=r"^the Dask LocalCluster of scheduler 'local:1' "
                                              r"did not start its 1 worker process\(es\) "
                                              r"\(ModuleNotFoundError: No module named "
                                              r"'lca_test_no_such_preload'\); run in this "
                                              r"process with scheduler='sync' \(CLI: --scheduler "
                                              r"sync\) or 'threads'") as info:
            replay.run(trajectory, task=TinyMLP(train_size=32, test_size=16), out=str(out),
                       scheduler="local:1", progress=False)
    assert "\n" not in str(info.value)
    assert not out.exists()  # the cube it had created held nothing: removed again


def test_an_unreachable_scheduler_is_one_line(trajectory, tmp_path):
    import dask
    import distributed  # noqa: F401

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        # the root cause is the refusal, or the time-out when the retries ran out first
        with pytest.raises(ReplayError, match=rf"^could not connect to {address} "
                                              r"\((ConnectionRefusedError|OSError): [^\n]*\); "
                                              r"check that the scheduler runs \(`dask "
                                              r"scheduler`\) and is reachable") as info:
            replay.run(trajectory, task=TinyMLP(train_size=32, test_size=16),
                       out=str(tmp_path / "cube.zarr"), scheduler=address, progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "cube.zarr").exists()
