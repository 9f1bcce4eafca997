"""hydra/launcher=submitit_slurm on a real SLURM (scripts/slurm_local.sh: one node, no GPU; `make test-slurm`).

Each sweep runs two jobs with the same overrides (seed=3,3): job 1 is the uninterrupted twin of job 0. Job 0 is
requeued mid-run (`scontrol requeue`: SIGTERM, SLURM's own requeue) or sent USR2 (submitit's time-limit and
preemption signal: submitit requeues it), released from SLURM's hold (BeginTime) and must end with job 1's
weights, test error and epochs, one last.ckpt, its csv continued, and a log that says what happened. A DDP job
(2 tasks) is requeued the same way, and a submission sbatch refuses is one line, exit 2.

Without a cluster these tests are skipped, except under CI or `make test-slurm` (ALLCONV_SLURM_REQUIRED=1),
where a cluster that does not answer fails them.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, TRAIN_PY, only_line, run_cli, write_npz

pytestmark = [pytest.mark.slurm, pytest.mark.subprocess, pytest.mark.timeout(900)]

EPOCHS = 12
STEPS_PER_EPOCH = 4  # 512 training images, batch 128
COMMON = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=null",
          "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=30",
          "model=all_cnn_c", "model.width=0.25", "data=npz", f"trainer.max_epochs={EPOCHS}",
          "callbacks.guided_backprop.every_n_epochs=0", "print_config=false"]


def _cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    proc = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mixed", "allocated", "completing"))


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if not _cluster_answers():
        if os.environ.get("CI") or os.environ.get("ALLCONV_SLURM_REQUIRED"):
            pytest.fail("no SLURM cluster answers (partition debug); start one with scripts/slurm_local.sh")
        pytest.skip("no SLURM cluster here (scripts/slurm_local.sh starts one; make test-slurm)")


def _start(tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    data = write_npz(tmp_path / "data.npz", n_train=512, n_test=64)
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ALLCONV_CACHE": str(tmp_path / "zca")}
    proc = subprocess.Popen([PYTHON, str(TRAIN_PY), "-m", *COMMON, f"data.path={data}", f"hydra.sweep.dir={sweep}",
                             *overrides], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    return proc, sweep


def _wait(condition, what: str, timeout: float = 300.0, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {proc.returncode}) while waiting for {what}:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _job_id(sweep: Path, num: int) -> str:
    """SLURM's id of sweep job `num`, from submitit's folder names: <array id>_<num>, or <id> for a sweep of one."""
    folders = [p.name for p in (sweep / ".submitit").glob("*") if p.is_dir()]
    named = [f for f in folders if f.endswith(f"_{num}")] or [f for f in folders if num == 0 and f.isdigit()]
    return named[0] if named else ""


def _epochs_saved(run: Path) -> int:
    ckpt = run / "checkpoints" / "last.ckpt"
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # not written yet, or being renamed into place
        return 0


def _state(job: str) -> str:
    proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return proc.stdout.strip()


def _interrupt_and_release(proc, sweep: Path, run: Path, command: list[str]) -> str:
    """Once job 0 is a few epochs in: send `command` to it, wait until SLURM holds it again, release it."""
    job = _wait(lambda: _job_id(sweep, 0), "job 0's submitit folder", proc=proc)
    _wait(lambda: _epochs_saved(run) >= 2, "job 0 to reach epoch 2", proc=proc)
    subprocess.run([*command, job], check=True, timeout=60)
    # SLURM holds a requeued job about two minutes (BeginTime); StartTime=now lets it start once it is pending
    _wait(lambda: _state(job) == "PENDING", f"job {job} to be requeued", proc=proc)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=60)
    return job


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _weights(run: Path) -> tuple[dict, int]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


def _log(sweep: Path, job: str) -> str:
    return "".join(p.read_text() for p in sorted((sweep / ".submitit" / job).glob("*_log.*")))


def _check_twins(sweep: Path, job: str, signal_name: str) -> None:
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in runs] == ["0_all_cnn_c_lr0.05_s3", "1_all_cnn_c_lr0.05_s3"]  # same overrides, 2 folders
    (w0, step0), (w1, step1) = _weights(runs[0]), _weights(runs[1])
    assert step0 == step1 == EPOCHS * STEPS_PER_EPOCH
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    m0, m1 = (json.loads((r / "metrics.json").read_text()) for r in runs)
    assert m0["status"] == m1["status"] == "finished" and m0["epochs"] == m1["epochs"] == EPOCHS
    assert m0["test_error"] == m1["test_error"]
    assert sorted(p.name for p in (runs[0] / "checkpoints").iterdir()) == ["last.ckpt"]  # no last-v1, no hpc_ckpt
    rows0, rows1 = ([r["epoch"] for r in csv.DictReader((r / "csv" / "metrics.csv").open())] for r in runs)
    assert rows0 == rows1 and len(rows0) == EPOCHS + 1  # one row per epoch and the test row: continued, not restarted
    log = _log(sweep, job)
    assert re.search(rf"error: interrupted by {signal_name} at .*: saved .*last\.ckpt; continue with: "
                     rf"python src/train\.py resume=", log), log[-3000:]
    assert "started again after a requeue" in log, log[-3000:]
    resumed = re.search(r"continuing from checkpoints/last\.ckpt \(epoch (\d+), global step (\d+)\)", log)
    assert resumed and 0 < int(resumed.group(2)) < EPOCHS * STEPS_PER_EPOCH, log[-3000:]  # not from epoch 0
    assert "Job completed successfully" in log


def test_requeued_job_continues_to_its_uninterrupted_twin(tmp_path):
    """scontrol requeue: SIGTERM, the run saves at the next step and exits; SLURM starts it again in its folder."""
    proc, sweep = _start(tmp_path, "seed=3,3")
    job = _interrupt_and_release(proc, sweep, sweep / "0_all_cnn_c_lr0.05_s3", ["scontrol", "requeue"])
    _finish(proc)
    _check_twins(sweep, job, "SIGTERM")


def test_usr2_saves_then_submitit_requeues_to_the_twin(tmp_path):
    """submitit's signal (sent before the time limit, or here by hand): save first, then submitit requeues."""
    proc, sweep = _start(tmp_path, "seed=3,3")
    job = _interrupt_and_release(proc, sweep, sweep / "0_all_cnn_c_lr0.05_s3", ["scancel", "--signal=USR2"])
    _finish(proc)
    _check_twins(sweep, job, "SIGUSR2")
    log = _log(sweep, job)
    assert "handing SIGUSR2 to submitit" in log and "Requeued job" in log, log[-3000:]


def test_ddp_job_of_two_tasks_requeued_mid_run(tmp_path):
    """trainer=ddp with 2 SLURM tasks: every rank stops at the same step, one checkpoint, and it continues."""
    proc, sweep = _start(tmp_path, "seed=3", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                         "hydra.launcher.tasks_per_node=2", "data.batch_size=64")
    run = sweep / "0_all_cnn_c_lr0.05_s3"
    job = _interrupt_and_release(proc, sweep, run, ["scontrol", "requeue"])
    _finish(proc)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs"] == EPOCHS
    assert metrics["ddp"]["world_size"] == 2 and metrics["ddp"]["weights_identical"]
    _, steps = _weights(run)
    assert steps == EPOCHS * STEPS_PER_EPOCH  # each rank steps through its half of 512 images, 64 at a time
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    log = _log(sweep, job)
    stops = re.findall(r"error: interrupted by SIGTERM at (.*?): saved", log)
    assert len(stops) == 2 and stops[0] == stops[1], log[-3000:]  # both ranks, the same step
    assert re.search(r"continuing from checkpoints/last\.ckpt \(epoch \d+, global step [1-9]", log), log[-3000:]


def test_refused_submission_is_one_line_exit_2(tmp_path):
    data = write_npz(tmp_path / "data.npz", n_train=64, n_test=16)
    sweep = tmp_path / "sweep"
    overrides = [o for o in COMMON if not o.startswith("hydra.launcher.gpus_per_node")]
    rc, out, err = run_cli("-m", *overrides, "hydra.launcher.gpus_per_node=1", f"data.path={data}", "seed=3,3",
                           f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert rc == 2
    line = only_line(err)
    assert line == ("error: sbatch refused the job: Invalid generic resource (gres) specification; change "
                    "hydra.launcher.gpus_per_node (null on a partition without GPUs; or gres)")
    assert not any(p.is_dir() and not p.name.startswith(".") for p in sweep.glob("*"))  # no job ran


SBATCH = Path(__file__).resolve().parents[1] / "scripts" / "slurm_train.sbatch"


def _sbatch(tmp_path: Path, name: str, data: Path) -> str:
    env = {**os.environ, "ALLCONV_RUN_DIR": str(tmp_path / name), "ALLCONV_CACHE": str(tmp_path / "zca"),
           "ALLCONV_PYTHON": PYTHON}
    proc = subprocess.run(["sbatch", "--parsable", f"--chdir={SBATCH.parents[1]}", "-p", "debug", "--cpus-per-task=1",
                           "--mem=2G", "--time=30", "-o", str(tmp_path / f"{name}.log"), str(SBATCH), "data=npz",
                           f"data.path={data}", "model.width=0.25", f"trainer.max_epochs={EPOCHS}", "seed=3",
                           "callbacks.guided_backprop.every_n_epochs=0", "callbacks.progress_bar=none",
                           "print_config=false"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job_state(job: str) -> str:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    found = re.search(r"JobState=(\S+)", proc.stdout)
    return found.group(1) if found else ""


def test_sbatch_script_requeued_mid_run_continues_to_its_twin(tmp_path):
    """scripts/slurm_train.sbatch, the hand-written route: requeued mid-run, it resumes in its own folder; both
    jobs end COMPLETED (the script does not turn a finished run into a failed job)."""
    data = write_npz(tmp_path / "data.npz", n_train=512, n_test=64)
    job, twin = _sbatch(tmp_path, "interrupted", data), _sbatch(tmp_path, "twin", data)
    run = tmp_path / "interrupted"
    _wait(lambda: _epochs_saved(run) >= 2, "the job to reach epoch 2")
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    _wait(lambda: _state(job) == "PENDING", f"job {job} to be requeued")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=60)
    _wait(lambda: _state(job) == "" and _state(twin) == "", "both jobs to end", timeout=600)
    assert _job_state(job) == _job_state(twin) == "COMPLETED"
    (w0, step0), (w1, step1) = _weights(run), _weights(tmp_path / "twin")
    assert step0 == step1 == EPOCHS * STEPS_PER_EPOCH and all(torch.equal(w0[k], w1[k]) for k in w0)
    m0, m1 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("interrupted", "twin"))
    assert m0["test_error"] == m1["test_error"] and m0["epochs"] == m1["epochs"] == EPOCHS
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    log = (tmp_path / "interrupted.log").read_text()
    assert "error: interrupted by SIGTERM" in log and f"slurm_train: job {job} (restart 1) continues" in log, log
