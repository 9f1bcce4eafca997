"""A run folder is never overwritten; a sweep relaunched into its folder skips the finished jobs, continues
the interrupted one from its checkpoint (to the weights of an uninterrupted twin) and runs the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from allconv import sweep_folder
from allconv.run_folder import RunFolder
from conftest import PYTHON, TRAIN_PY, only_line, run_cli, write_npz
from test_resume import csv_rows, trained_epochs

EPOCHS = 3


def run_args(data: Path, width: float = 0.125) -> list[str]:
    return ["data=npz", f"data.path={data}", "data.preprocess=standardize", f"model.width={width}",
            f"trainer.max_epochs={EPOCHS}", "data.batch_size=32", "logger=csv", "callbacks.progress_bar=none",
            "trainer.enable_progress_bar=false", "print_config=false", "callbacks.guided_backprop.every_n_epochs=0"]


def sweep_args(data: Path, sweep: Path, width: float = 0.125) -> list[str]:
    return ["-m", *run_args(data, width), "seed=1,0,0", f"hydra.sweep.dir={sweep}"]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def job(sweep: Path, num: int) -> Path:
    return next(sweep.glob(f"{num}_*"))


@pytest.fixture(scope="module")
def relaunched(tmp_path_factory):
    """seed=1,0,0: job 0 finishes, job 1 is stopped by SIGTERM inside its second epoch, job 2 (its twin) never
    starts; then the same command again into the same folder. Beside it, seed 0 as a single uninterrupted run."""
    tmp = tmp_path_factory.mktemp("sweep_restart")
    data = write_npz(tmp / "data.npz", n_train=320, n_test=32)
    sweep = tmp / "sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([PYTHON, str(TRAIN_PY), *sweep_args(data, sweep)], cwd=tmp, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    twin = subprocess.Popen([PYTHON, str(TRAIN_PY), *run_args(data), "seed=0", f"hydra.run.dir={tmp / 'twin'}"],
                            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list(sweep.glob("1_*/checkpoints/last.ckpt")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGTERM)  # job 1 saved its first epoch: it stops at its next step boundary
    _, first_err = first.communicate(timeout=240)
    assert first.returncode == 128 + signal.SIGTERM, first_err[-3000:]
    before = {0: snapshot(job(sweep, 0)), 1: snapshot(job(sweep, 1))}
    rc, out, err = run_cli(*sweep_args(data, sweep), cwd=tmp)
    assert rc == 0, err[-3000:]
    assert twin.wait(timeout=300) == 0, twin.stderr.read()[-3000:]
    return tmp, data, sweep, before, err


@pytest.mark.system
@pytest.mark.subprocess
def test_relaunched_sweep_skips_finished_continues_interrupted_runs_the_rest(relaunched):
    _, _, sweep, before, err = relaunched
    assert before[1]["metrics.json"][0] and json.loads(before[1]["metrics.json"][0])["status"] == "interrupted"
    # the finished job: its files untouched, bytes and times (nothing, Hydra included, writes a finished run)
    after = snapshot(job(sweep, 0))
    assert after.keys() == before[0].keys()
    for name, (data, mtime) in after.items():
        assert data == before[0][name][0], name
        assert mtime == before[0][name][1], name
    assert f"{job(sweep, 0)}: already finished (test error" in err
    assert f"{job(sweep, 1)}: continuing from checkpoints/last.ckpt (epoch" in err
    metrics = {n: json.loads((job(sweep, n) / "metrics.json").read_text()) for n in range(3)}
    assert all(m["status"] == "finished" and m["epochs"] == EPOCHS for m in metrics.values())
    # job 1 trained each epoch once (its csv continued: no epoch trained twice), job 2 from scratch
    assert trained_epochs(csv_rows(job(sweep, 1))) == trained_epochs(csv_rows(job(sweep, 2))) == list(range(EPOCHS))
    assert sorted(p.name for p in (job(sweep, 1) / "checkpoints").iterdir()) == ["last.ckpt"]
    # the interrupted job ends where its uninterrupted twins (the same settings: seed 0) end
    tmp = sweep.parent
    assert metrics[1]["test_error"] == metrics[2]["test_error"]
    assert metrics[1]["test_error"] == json.loads((tmp / "twin" / "metrics.json").read_text())["test_error"]
    w1, w2 = (torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
              for folder in (job(sweep, 1), tmp / "twin"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.system
@pytest.mark.subprocess
def test_a_changed_sweep_is_refused_before_anything_is_written(relaunched):
    tmp, data, sweep, _, _ = relaunched
    everything = snapshot(sweep)
    rc, out, err = run_cli(*sweep_args(data, sweep, width=0.25), cwd=tmp)  # the width is not in the folder name
    assert rc == 2
    line = only_line(err)
    assert line.startswith(f"error: job 0's folder '{job(sweep, 0)}' holds another run (model.width "
                           f"0.125 vs 0.25)"), line
    assert snapshot(sweep) == everything


@pytest.mark.system
@pytest.mark.subprocess
def test_a_run_being_trained_cannot_be_resumed_by_a_second_process(relaunched):
    tmp, _, sweep, _, _ = relaunched
    run = job(sweep, 1)
    (run / "metrics.json").rename(run / "metrics.done")  # interrupted again, as far as the folder says
    try:
        everything = snapshot(run)
        RunFolder(run).hold()  # this process trains it
        rc, out, err = run_cli(f"resume={run}", cwd=tmp)
        assert rc == 2 and only_line(err) == (f"error: {run} is being trained by another process; wait for it to "
                                              f"end (two processes cannot train one run)")
        assert snapshot(run) == everything
    finally:
        RunFolder(run).release()
        (run / "metrics.done").rename(run / "metrics.json")


def _fake_run(folder: Path, status: str | None, ckpt: bool) -> Path:
    folder.mkdir(parents=True)
    if status:
        (folder / "metrics.json").write_text(json.dumps({"status": status, "test_error": 0.5}))
    if ckpt:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"not read by the refusal")
    return folder


@pytest.mark.parametrize("status, ckpt, held", [
    ("ok", True, "a finished run (metrics.json); a run is never overwritten: choose another hydra.run.dir"),
    ("interrupted", True, "an interrupted run (checkpoints/last.ckpt); a run is never overwritten: continue it "
                          "with: python src/train.py resume={run}"),
    ("failed", False, "files of another run; a run is never overwritten: choose another hydra.run.dir"),
])
def test_a_new_run_into_a_folder_that_holds_a_run_is_refused(run_entry, tmp_path, status, ckpt, held):
    run = _fake_run(tmp_path / "run", status, ckpt)
    everything = snapshot(run)
    code, out, err = run_entry("model.width=0.125", f"hydra.run.dir={run}", "data=npz",
                               f"data.path={write_npz(tmp_path / 'data.npz')}")
    assert code == 2
    assert only_line(err).startswith(f"error: hydra.run.dir='{run}' already holds {held.format(run=run)}")
    assert snapshot(run) == everything


def test_plan_of_a_sweep_job_follows_its_folder(tmp_path):
    assert sweep_folder.plan_job(RunFolder(tmp_path / "absent")).action == "train"
    assert sweep_folder.plan_job(RunFolder(_fake_run(tmp_path / "started", "failed", False))).action == "train"
    done = sweep_folder.plan_job(RunFolder(_fake_run(tmp_path / "done", "ok", True)))
    assert done.action == "skip" and done.metrics["test_error"] == 0.5
    from allconv.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"broken/checkpoints/last\.ckpt"):  # a damaged one is not trained over
        sweep_folder.plan_job(RunFolder(_fake_run(tmp_path / "broken", "interrupted", True)))
    (tmp_path / "done" / "metrics.json").write_text("{not json")
    assert RunFolder(tmp_path / "done").state() == "interrupted"  # a metrics.json that does not parse is no result
