"""Cluster layer: dask-jobqueue job scripts and clusters, SLURM arrays, ``lca status``.

Tests marked ``slurm`` run real jobs on the single-node SLURM of scripts/slurm-up.sh.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import dask.config
import numpy as np
import pytest
import xarray as xr
from tests.slurm import job_states, slurm, wait_for_jobs  # noqa: F401  (slurm is a fixture)

from replay.cluster.job_array import array_script, finish_script, submit
from replay.cluster.jobqueue import (
    ClusterError,
    job_script,
    make_jobqueue_cluster,
    walltime_seconds,
    worker_lifetime,
)
from replay.commands.submit import format_ranges, missing_ranges

# ---- dask-jobqueue job scripts ----------------------------------------------------------------------


def test_slurm_job_script_has_overrides_threads_and_lifetime():
    text = job_script("slurm", cores=4, memory="8GB", walltime="01:00:00", queue="debug",
                      account="proj", python="/opt/env/bin/python")
    lines = text.splitlines()
    for line in ("#SBATCH -p debug", "#SBATCH -A proj", "#SBATCH --cpus-per-task=4",
                 "#SBATCH -t 01:00:00", "#SBATCH -J lca-worker",
                 "export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "
                 "NUMBA_NUM_THREADS=1"):
        assert line in lines
    command = lines[-1]
    assert command.startswith("/opt/env/bin/python -m distributed.cli.dask_worker ")
    # like LocalCluster: one single-threaded worker process per core
    assert " --nthreads 1 " in command and " --nworkers 4 " in command
    # one hour: stagger 3 min, margin 3 min -> retire after 54 +- 3 min
    assert command.endswith(" --lifetime 3240s --lifetime-stagger 180s")


def test_worker_jobs_run_with_the_quiet_dask_settings():
    from replay.cluster.worker_env import QUIET_DASK

    exports = [line for line in job_script("slurm", cores=2, memory="2GB").splitlines()
               if line.startswith("export DASK_")]
    assert len(exports) == 1
    # what a worker process of the job reads back through dask's own environment parsing
    env = dict(os.environ)
    env.update(pair.split("=", 1) for pair in exports[0].split()[1:])
    code = ("import dask, json; from replay.cluster.worker_env import QUIET_DASK; "
            "print(json.dumps({k: dask.config.get(k) for k in QUIET_DASK}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == QUIET_DASK


def test_torch_threads_per_task_shape_the_workers():
    one = job_script("slurm", cores=4, memory="8GB", threads=4).splitlines()
    assert "export OMP_NUM_THREADS=4 MKL_NUM_THREADS=4 OPENBLAS_NUM_THREADS=4 " \
        "NUMBA_NUM_THREADS=4" in one
    # one process; dask-jobqueue's --nthreads 4 is overridden by the later --nthreads 1
    assert "--nworkers" not in one[-1] and "--nthreads 4 " in one[-1]
    assert "--nthreads 1 --lifetime" in one[-1]
    two = job_script("slurm", cores=8, memory="8GB", threads=2, processes=2).splitlines()[-1]
    assert "--nworkers 2 " in two and two.index("--nthreads 4") < two.index("--nthreads 2")
    with pytest.raises(ClusterError, match=r"^threads must be a positive integer \(torch threads "
                       r"per task\), got 0$"):
        job_script("slurm", cores=2, memory="2GB", threads=0)


def test_job_script_defaults_to_this_python_and_config_walltime():
    with dask.config.set({"jobqueue.slurm.walltime": "00:10:00"}):
        text = job_script("slurm", cores=1, memory="1GB")
    assert f"{sys.executable} -m distributed.cli.dask_worker" in text
    assert "#SBATCH -t 00:10:00" in text
    assert "--lifetime 510s --lifetime-stagger 30s" in text


def test_job_script_reads_a_named_config_section():
    site = {"cores": 3, "memory": "6GB", "queue": "long", "walltime": "02:00:00",
            "job-script-prologue": ["module load cuda"]}
    with dask.config.set({"jobqueue.mysite": site}):
        text = job_script("slurm", config_name="mysite", account="proj")
    lines = text.splitlines()
    assert {"#SBATCH -p long", "#SBATCH -A proj", "#SBATCH --cpus-per-task=3",
            "module load cuda"} <= set(lines)
    # the site's prologue runs first, then the thread settings
    assert lines.index("module load cuda") < lines.index(
        "export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1")
    assert "--lifetime 6540s --lifetime-stagger 300s" in text


def test_lifetime_can_be_fixed_or_turned_off():
    fixed = job_script("slurm", cores=2, memory="2GB", lifetime="50m")
    assert "--lifetime 3000s --lifetime-stagger 150s" in fixed
    off = job_script("slurm", cores=2, memory="2GB", lifetime=False)
    assert "--lifetime" not in off


def test_cuda_job_asks_for_one_gpu_and_one_worker():
    text = job_script("slurm", cores=4, memory="16GB", device="cuda", threads=4)
    assert "#SBATCH --gres=gpu:1" in text.splitlines()
    assert "export OMP_NUM_THREADS=4 " in text
    assert text.rstrip().endswith("--nthreads 1 --lifetime 1620s --lifetime-stagger 90s "
                                  "--resources GPU=1")
    with pytest.raises(ClusterError, match=r"device cuda runs one worker per job with one GPU: "
                       r"set processes=1, not 2 \(jobqueue.slurm.processes\)"):
        job_script("slurm", cores=4, memory="16GB", device="cuda", processes=2)
    with pytest.raises(ClusterError, match=r"device cuda on sge: add your site's one-GPU request "
                       r"to jobqueue.sge.job-extra-directives"):
        job_script("sge", cores=4, memory="16GB", device="cuda")


def test_pbs_job_script_uses_account_and_queue():
    text = job_script("pbs", cores=2, memory="4GB", queue="workq", account="proj")
    assert {"#PBS -q workq", "#PBS -A proj"} <= set(text.splitlines())


def test_cores_and_memory_must_be_set():
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        with pytest.raises(ClusterError, match=r"^cores and memory per slurm job are not set: pass "
                           r"them \(cores=8, memory='32GB'\) or set jobqueue.slurm.cores and "
                           r"jobqueue.slurm.memory in ~/.config/dask/jobqueue.yaml$"):
            job_script("slurm", cores=None, memory="4GB")


def test_unknown_kind_and_section_are_named():
    with pytest.raises(ClusterError, match=r"^unknown job queue system 'kubernetes': choose one "
                       r"of htcondor, lsf, moab, oar, pbs, sge, slurm$"):
        job_script("kubernetes", cores=1, memory="1GB")
    with pytest.raises(ClusterError, match=r"^no dask config section jobqueue.nosuchsite: add it "
                       r"to ~/.config/dask/jobqueue.yaml"):
        job_script("slurm", config_name="nosuchsite")


def test_missing_dask_jobqueue_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # what `import` sees when absent
    with pytest.raises(ClusterError, match=r"^--scheduler slurm needs dask-jobqueue: "
                       r"pip install 'lca-replay\[cluster\]'$"):
        make_jobqueue_cluster("slurm", cores=1, memory="1GB")


@pytest.mark.parametrize(("walltime", "kind", "seconds"), [
    ("30", "slurm", 1800), ("30:15", "slurm", 1815), ("01:00:00", "slurm", 3600),
    ("1-00", "slurm", 86400), ("2-01:30", "slurm", 178200), ("1-00:00:05", "slurm", 86405),
    ("01:30", "lsf", 5400), ("45", "lsf", 2700), ("00:30:00", "pbs", 1800), ("90", "pbs", 90),
    (None, "slurm", None),
])
def test_walltime_seconds(walltime, kind, seconds):
    assert walltime_seconds(walltime, kind) == seconds


def test_bad_walltime_is_named():
    with pytest.raises(ClusterError, match=r"^walltime 'soon' is not a slurm duration: write it "
                       r"like '01:30:00'"):
        walltime_seconds("soon", "slurm")


def test_worker_lifetime_leaves_room_before_the_walltime():
    assert worker_lifetime(None) is None
    assert worker_lifetime(120) is None  # too short to retire usefully
    for walltime in (600, 3600, 86400):
        lifetime, stagger = worker_lifetime(walltime)
        assert 0 < stagger < lifetime and lifetime + stagger < walltime - 30


# ---- array scripts -------------------------------------------------------------------------


def _recording_python(path, log):
    """An executable standing in for the jobs' Python: it appends its arguments to `log`."""
    path.write_text("#!/bin/bash\n"
                    f'echo "${{SLURM_ARRAY_TASK_ID:-finish}} $(date +%s%N) $*" >> {log}\n'
                    'if [[ "$*" == *"--steps 4:8"* && -n "${LCA_TEST_FAIL_TASK:-}" ]]; then '
                    'exit 1; fi\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_array_script_has_one_slice_per_task(tmp_path):
    text = array_script(tmp_path / "c.yaml", cube=tmp_path / "cube.zarr",
                        slices=[(0, 40), (40, 80), (80, 160)], python="/env/bin/python",
                        extra_sbatch=["--partition=debug", "--time=1:00:00"], log_dir=tmp_path)
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert {"#SBATCH --array=0-2", "#SBATCH --partition=debug", "#SBATCH --time=1:00:00",
            f"#SBATCH --output={tmp_path}/replay-%A_%a.out", "slices=(0:40 40:80 80:160)"} \
        <= set(lines)
    assert lines[-1] == (f"exec /env/bin/python -m replay.cli replay {tmp_path}/c.yaml --cube "
                         f'{tmp_path}/cube.zarr --steps "$steps" --scheduler "local:$cpus"')


def test_array_task_runs_its_own_slice(tmp_path):
    """Run the array script under bash as SLURM would, for task 1 of 3."""
    log = tmp_path / "calls.log"
    python = _recording_python(tmp_path / "python", log)
    script = tmp_path / "array.sh"
    script.write_text(array_script("c.yaml", cube="s3://bucket/cube.zarr", python=str(python),
                                   slices=[(0, 4), (4, 8), (8, 10)]))
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="1", SLURM_CPUS_PER_TASK="3")
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    task, _, *argv = log.read_text().split()
    assert task == "1"
    assert argv == ["-m", "replay.cli", "replay", os.path.abspath("c.yaml"), "--cube",
                    "s3://bucket/cube.zarr", "--steps", "4:8", "--scheduler", "local:3"]


def test_finish_script_finalises_then_reports(tmp_path):
    lines = finish_script("c.yaml", cube="out/cube.zarr", python="py", scheduler="threads",
                          log_dir=tmp_path).splitlines()
    assert f"#SBATCH --output={tmp_path}/finish-%j.out" in lines
    cube = os.path.abspath("out/cube.zarr")
    assert lines[-2:] == [f"py -m replay.cli replay {os.path.abspath('c.yaml')} --cube {cube} "
                          "--scheduler threads", f"exec py -m replay.cli status {cube}"]


def test_dry_run_writes_nothing(tmp_path):
    result = submit(tmp_path / "c.yaml", cube=tmp_path / "cube.zarr", slices=[(0, 4)],
                    dry_run=True)
    assert result.array_job is None and result.finish_job is None
    assert result.jobs_dir == tmp_path / "cube.zarr.jobs"
    assert "#SBATCH --array=0-0" in result.array_script
    assert list(tmp_path.iterdir()) == []


# ---- lca submit ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A config whose 12-step TinyMLP trajectory is recorded: 12 intervals, chunks of 3."""
    from replay.cli import main

    root = tmp_path_factory.mktemp("submit")
    config = root / "c.yaml"
    config.write_text(
        'task: {ref: "replay.tasks.tiny_mlp:TinyMLP", args: {seed: 3, train_size: 96, '
        'test_size: 32}}\n'
        "train: {steps: 12, lr: 0.05, batch_size: 16}\n"
        f"record: {{path: {root}/traj}}\n"
        f"replay: {{cube: {root}/cube.zarr, chunk_size: 3, groups: [tensor], "
        "datasets: [train, test]}\n")
    assert main(["train", str(config)]) == 0
    return config


def test_submit_dry_run_prints_chunk_aligned_slices(trained, tmp_path, capsys):
    from replay.cli import main

    cube = tmp_path / "cube.zarr"
    capsys.readouterr()
    assert main(["submit", str(trained), "--cube", str(cube), "--array", "3", "--dry-run",
                 "--partition", "debug", "--time", "10", "--mem", "2G"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # 4 chunks of 3 intervals in 3 slices: no chunk split between two tasks
    assert {"slices=(0:3 3:9 9:12)", "#SBATCH --array=0-2", "#SBATCH --partition=debug",
            "#SBATCH --time=10", "#SBATCH --mem=2G",
            f"# {cube}.jobs/replay-array.sh (3 tasks)"} <= set(lines)
    assert lines[-1] == f"exec {sys.executable} -m replay.cli status {cube}"
    assert list(tmp_path.iterdir()) == []  # no cube, no scripts


def test_submit_without_a_chunk_size_makes_chunks_for_every_task(trained, tmp_path, capsys):
    # The default cube chunk holds several tasks' steps (one chunk of 12 here); for an array
    # of 4 the new cube is chunked so that each task still gets whole chunks of its own.
    from replay.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(trained.read_text().replace("chunk_size: 3, ", ""))
    cube = tmp_path / "cube.zarr"
    capsys.readouterr()
    assert main(["submit", str(config), "--cube", str(cube), "--array", "4", "--dry-run"]) == 0
    assert "slices=(0:3 3:6 6:9 9:12)" in capsys.readouterr().out.splitlines()


# ---- lca status ---------------------------------------------------------------------------------------


def _cube(path, steps, done):
    xr.Dataset({"done": ("step", np.asarray(done, dtype=bool))},
               coords={"step": np.asarray(steps, dtype=np.int64)}).to_zarr(path, consolidated=False)
    return str(path)


def test_missing_ranges_are_compact():
    steps = list(range(0, 160, 10))
    done = [s not in (40, 50, 60, 120, 150) for s in steps]
    assert format_ranges(missing_ranges(steps, done)) == "40-60, 120, 150"
    assert missing_ranges(steps, [True] * 16) == []
    many = [(i, i) for i in range(0, 50, 2)]
    assert format_ranges(many, limit=3) == "0, 2, 4, ... and 22 more ranges"


def test_status_reports_and_exits_by_completeness(tmp_path, capsys):
    from replay.cli import main

    steps = np.arange(160)
    cube = _cube(tmp_path / "part.zarr", steps, (steps < 40) | ((steps >= 80) & (steps < 120)))
    assert main(["status", cube]) == 3
    assert capsys.readouterr().out.splitlines() == [f"{cube}: 80/160 steps done",
                                                    "missing: 40-79, 120-159"]
    full = _cube(tmp_path / "full.zarr", steps, np.ones(160, bool))
    assert main(["status", full]) == 0
    assert capsys.readouterr().out == f"{full}: 160/160 steps done\n"


def test_status_of_a_missing_cube_is_an_error(tmp_path, capsys):
    from replay.cli import main

    assert main(["status", str(tmp_path / "nope.zarr")]) == 1
    assert capsys.readouterr().err == (f"lca status: error: no cube at {tmp_path}/nope.zarr: "
                                       f"make it with lca replay CONFIG --cube "
                                       f"{tmp_path}/nope.zarr\n")


# ---- real SLURM -----------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
@pytest.mark.slow
def test_slurm_cluster_runs_dask_work_in_batch_jobs(tmp_path):
    from distributed import Client

    cluster = make_jobqueue_cluster(
        "slurm", jobs=2, cores=1, memory="1GB", walltime="00:10:00", processes=1,
        extra={"log_directory": str(tmp_path), "scheduler_options": {"dashboard_address": ":0"}})
    with cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=180)
        workers = client.scheduler_info()["workers"].values()
        assert [w["nthreads"] for w in workers] == [1, 1]

        def where(x):  # nested: pickled by value, the workers cannot import this test module
            return x * x, os.environ["SLURM_JOB_ID"], os.environ["OMP_NUM_THREADS"]

        results = client.gather(client.map(where, range(8)))
    assert [r[0] for r in results] == [x * x for x in range(8)]
    assert {r[2] for r in results} == {"1"}
    assert all(r[1].isdigit() for r in results)


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_sbatch_array_then_dependent_finish(tmp_path):
    log = tmp_path / "calls.log"
    python = _recording_python(tmp_path / "python", log)
    result = submit(tmp_path / "c.yaml", cube=tmp_path / "cube.zarr", slices=[(0, 4), (4, 8)],
                    python=str(python), extra_sbatch=["--time=5", "--mem=100M"])
    assert (tmp_path / "cube.zarr.jobs" / "replay-array.sh").read_text() == result.array_script
    wait_for_jobs([result.array_job, result.finish_job])
    assert job_states(result.array_job) == ["COMPLETED", "COMPLETED"]
    assert job_states(result.finish_job) == ["COMPLETED"]

    calls = [line.split() for line in log.read_text().splitlines()]
    tasks = {c[0]: c for c in calls if c[0] != "finish"}
    assert tasks["0"][2:] == ["-m", "replay.cli", "replay", f"{tmp_path}/c.yaml", "--cube",
                              f"{tmp_path}/cube.zarr", "--steps", "0:4", "--scheduler", "local:1"]
    assert tasks["1"][9] == "4:8"
    finish = [c for c in calls if c[0] == "finish"]
    assert [c[4] for c in finish] == ["replay", "status"]
    assert min(int(c[1]) for c in finish) > max(int(c[1]) for c in tasks.values())
    assert sorted(p.name.split("_")[0].split("-")[0] for p in result.jobs_dir.glob("*.out")) \
        == ["finish", "replay", "replay"]


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
def test_failed_array_task_cancels_the_finish(tmp_path, monkeypatch):
    monkeypatch.setenv("LCA_TEST_FAIL_TASK", "1")  # sbatch passes the environment on
    log = tmp_path / "calls.log"
    python = _recording_python(tmp_path / "python", log)
    result = submit(tmp_path / "c.yaml", cube=tmp_path / "cube.zarr", slices=[(0, 4), (4, 8)],
                    python=str(python), extra_sbatch=["--time=5", "--mem=100M"])
    wait_for_jobs([result.array_job, result.finish_job])
    assert sorted(job_states(result.array_job)) == ["COMPLETED", "FAILED"]
    assert job_states(result.finish_job) == ["CANCELLED"]
    assert "finish" not in log.read_text()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.usefixtures("slurm")
def test_submit_array_replay_equals_local_replay(trained, tmp_path, capsys):
    import re

    from replay.cli import main

    cube, ref = str(tmp_path / "array.zarr"), str(tmp_path / "ref.zarr")
    # the cube exists before the array starts, so no two tasks race to create it
    assert main(["replay", str(trained), "--cube", cube, "--steps", "0:1", "--scheduler", "sync",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["submit", str(trained), "--cube", cube, "--array", "2", "--mem", "2G",
                 "--time", "10"]) == 0
    out = capsys.readouterr().out
    array_job = re.search(r"submitted array job (\d+) \(2 tasks: 0:6, 6:12\)", out).group(1)
    finish_job = re.search(r"submitted finishing job (\d+)", out).group(1)
    wait_for_jobs([array_job, finish_job], timeout=300)
    assert job_states(array_job) == ["COMPLETED", "COMPLETED"]
    assert job_states(finish_job) == ["COMPLETED"]
    finish_log = (tmp_path / "array.zarr.jobs" / f"finish-{finish_job}.out").read_text()
    assert finish_log.rstrip().endswith(f"{cube}: 12/12 steps done")
    assert main(["status", cube]) == 0

    assert main(["replay", str(trained), "--cube", ref, "--scheduler", "sync",
                 "--no-progress"]) == 0
    got, want = xr.open_zarr(cube), xr.open_zarr(ref)
    for name in ("lca", "helped", "loss", "loss_next", "residual", "done"):
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
