"""Launchers beyond one job at a time: hydra/launcher=local_parallel (joblib's pool, one GPU per worker)
and hydra/launcher=submitit_local (the submitit plugin's own pickling path, as submitit_slurm uses)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from allconv import local_parallel
from conftest import CONF, last_line, run_cli, write_npz

TINY = ["data=npz", "data.preprocess=standardize", "model.width=0.125", "trainer.max_epochs=2", "data.batch_size=32",
        "logger=none", "callbacks.progress_bar=none", "trainer.enable_progress_bar=false", "print_config=false",
        "callbacks.guided_backprop.every_n_epochs=0", "callbacks.checkpoint.every_n_epochs=0"]


# -- the rule -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_gpus, n_cpus, n_jobs, expected", [
    (8, 64, None, (8, 8)),   # an 8-GPU node: 8 jobs at once, 8 threads each
    (1, 16, None, (1, 16)),
    (0, 2, None, (2, 1)),    # no GPU: 2 jobs share the 2 cores
    (0, 16, None, (2, 8)),
    (4, 16, 8, (8, 2)),      # an explicit n_jobs wins: 2 jobs per GPU
])
def test_plan(n_gpus, n_cpus, n_jobs, expected):
    p = local_parallel.plan(n_gpus, n_cpus, n_jobs)
    assert (p.n_jobs, p.threads_per_job) == expected


def test_each_slot_its_own_gpu_with_a_mocked_device_count(monkeypatch):
    monkeypatch.setattr(local_parallel, "_gpu_count", lambda: 8)
    devices = local_parallel.visible_devices(env={})
    assert devices == [str(k) for k in range(8)]
    assert [local_parallel.device_for_slot(k, devices) for k in range(8)] == devices  # never all on GPU 0
    assert local_parallel.visible_devices(env={"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
    assert [local_parallel.device_for_slot(k, ["3", "5"]) for k in range(4)] == ["3", "5", "3", "5"]
    assert local_parallel.device_for_slot(0, []) is None  # no GPU: nothing to pin
    # the launcher's n_jobs, as Hydra resolves it from conf/hydra/launcher/local_parallel.yaml
    cfg = OmegaConf.load(CONF / "hydra" / "launcher" / "local_parallel.yaml")
    assert cfg.launcher.n_jobs == 8
    monkeypatch.setattr(local_parallel, "_gpu_count", lambda: 0)
    assert cfg.launcher.n_jobs == local_parallel.CPU_JOBS == 2


def _claim(folder, queue):
    local_parallel._slot = None  # a loky worker starts with no slot; a forked test child inherits the parent's
    queue.put(local_parallel.claim_slot(Path(folder), 2, timeout_s=5))


def test_worker_processes_claim_distinct_slots(tmp_path, monkeypatch):
    monkeypatch.setattr(local_parallel, "_slot", None)
    folder = tmp_path / "slots"
    assert local_parallel.claim_slot(folder, 2) == 0
    assert local_parallel.claim_slot(folder, 2) == 0  # the same process keeps its slot
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    for _ in range(2):  # one after the other: each child gets slot 1, freed when the previous child exited
        child = ctx.Process(target=_claim, args=(str(folder), queue))
        child.start()
        child.join(10)
        assert queue.get(timeout=5) == 1
    os.close(local_parallel._slot[1])


# -- the launchers, end to end ------------------------------------------------------------------------
def _jobs(sweep: Path) -> dict[str, dict]:
    """Each job's metrics.json, and its start (identity.json is written when the job starts) and end."""
    out = {}
    for m in sorted(sweep.glob("*/metrics.json")):
        record = json.loads(m.read_text())
        record["_start"], record["_end"] = (m.parent / "identity.json").stat().st_mtime, m.stat().st_mtime
        out[m.parent.name] = record
    return out


LRS = "optim.lr=0.05,0.01,1e30"  # lr 1e30 passes every check and diverges in its first epoch


def _check_jobs(jobs: dict[str, dict]) -> None:
    assert sorted(jobs) == ["0_all_cnn_c_lr0.05_s0", "1_all_cnn_c_lr0.01_s0", "2_all_cnn_c_lr1e+30_s0"]
    first, second, failed = jobs.values()
    assert first["status"] == second["status"] == "finished" and first["epochs"] == second["epochs"] == 2
    assert failed["status"] == "diverged" and "non-finite loss" in failed["error"]  # the others still finished
    assert first["_start"] < second["_end"] and second["_start"] < first["_end"]  # the first two ran at the same time


@pytest.mark.system
@pytest.mark.subprocess
def test_local_parallel_runs_two_jobs_at_once_each_on_its_own_device(tmp_path):
    data = write_npz(tmp_path / "data.npz", n_train=512, n_test=16)
    sweep = tmp_path / "sweep"
    rc, out, err = run_cli("-m", "hydra/launcher=local_parallel", *TINY, f"data.path={data}", LRS,
                           f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "7,9"})
    assert rc == 1, err[-3000:]  # every job ran; the diverging one fails the sweep, named on its last line
    assert last_line(err).startswith("error: 1 of 3 jobs failed: job 2 (2_all_cnn_c_lr1e+30_s0): non-finite loss")
    _check_jobs(_jobs(sweep))
    # No GPU here, so 2 jobs at once (the CPU rule), each in a worker pinned to its own listed device;
    # the third job runs in whichever worker is free first, on that worker's device.
    pins = re.findall(r"local_parallel: job (\d) in slot (\d) of 2: CUDA_VISIBLE_DEVICES=(\d+), \d+ torch threads",
                      err)
    assert sorted(job for job, _, _ in pins) == ["0", "1", "2"], err[-3000:]
    assert {(slot, device) for _, slot, device in pins} == {("0", "7"), ("1", "9")}


@pytest.mark.system
@pytest.mark.subprocess
def test_submitit_local_runs_a_two_job_grid(tmp_path):
    data = write_npz(tmp_path / "data.npz", n_train=64, n_test=16)
    sweep = tmp_path / "sweep"
    rc, out, err = run_cli("-m", "hydra/launcher=submitit_local", *TINY, f"data.path={data}", "optim.lr=0.05,1e30",
                           f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert rc == 1, err[-3000:]
    assert last_line(err).startswith("error: 1 of 2 jobs failed: job 1 (1_all_cnn_c_lr1e+30_s0): non-finite loss")
    jobs = _jobs(sweep)
    assert sorted(jobs) == ["0_all_cnn_c_lr0.05_s0", "1_all_cnn_c_lr1e+30_s0"]
    assert jobs["0_all_cnn_c_lr0.05_s0"]["status"] == "finished"
    assert jobs["1_all_cnn_c_lr1e+30_s0"]["status"] == "diverged"
    assert len(list((sweep / ".submitit").glob("*/*_submitted.pkl"))) == 2  # each job pickled, as for SLURM


def test_a_single_run_is_left_alone(tmp_path, monkeypatch):
    from hydra.types import RunMode

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(local_parallel, "_slot", None)
    cfg = OmegaConf.create({"hydra": {"mode": RunMode.RUN, "sweep": {"dir": str(tmp_path / "sweep")},
                                      "launcher": {"n_jobs": 2}, "job": {"num": 0}}})
    local_parallel.LocalParallel().on_job_start(config=cfg)
    assert not (tmp_path / "sweep").exists() and local_parallel._slot is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
