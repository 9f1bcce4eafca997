"""Resume: a CPU run killed with SIGKILL mid-epoch continues with `train.py resume=<run dir>`, trains only the
epochs after its checkpoint, and ends with the same weights and metrics as an uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from allconv.callbacks import FitClock
from allconv.resume import ResumeError, expand_argv
from conftest import PYTHON, TRAIN_PY, run_cli, write_npz

EPOCHS = 3


def args(data, run):
    return ["data=npz", f"data.path={data}", "data.preprocess=standardize", "model.width=0.125",
            f"trainer.max_epochs={EPOCHS}", "data.batch_size=32", "data.val_size=32", "logger=csv",
            "callbacks.progress_bar=none", "trainer.enable_progress_bar=false", "print_config=false",
            "callbacks.guided_backprop.every_n_epochs=0", f"hydra.run.dir={run}"]


def csv_rows(run) -> list[dict]:
    """The rows of a run's metrics.csv, each without its empty cells (the columns change as metrics appear)."""
    path = run / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def trained_epochs(rows) -> list[int]:
    """The epochs a process trained: one row with the epoch's training loss per epoch."""
    return sorted(int(r["epoch"]) for r in rows if r.get("train/loss"))


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = write_npz(tmp / "data.npz", n_train=320, n_test=32)
    full, killed = tmp / "full", tmp / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = subprocess.Popen([PYTHON, str(TRAIN_PY), *args(data, full)], cwd=tmp, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([PYTHON, str(TRAIN_PY), *args(data, killed)], cwd=tmp, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # end of epoch 0 just saved: now inside epoch 1
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()
    saved = torch.load(last, map_location="cpu", weights_only=True)
    saved_epoch, saved_clock = saved["epoch"], saved["callbacks"]["FitClock"]["elapsed_s"]
    assert saved_epoch < EPOCHS - 1
    rows_before = csv_rows(killed)

    rc, out, err = run_cli(f"resume={killed}", cwd=tmp)
    assert rc == 0, err[-3000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    return {"full": full, "killed": killed, "saved_epoch": saved_epoch, "saved_clock": saved_clock,
            "rows_before": rows_before}


@pytest.mark.system
@pytest.mark.subprocess
def test_resumed_run_matches_uninterrupted(killed_and_resumed):
    full, killed = killed_and_resumed["full"], killed_and_resumed["killed"]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, killed))
    assert a["epochs"] == b["epochs"] == EPOCHS
    assert (a["test_error"], a["val_error"]) == (b["test_error"], b["val_error"])
    wa, wb = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
              for d in (full, killed))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.system
@pytest.mark.subprocess
def test_resumed_process_trains_only_the_epochs_after_the_checkpoint(killed_and_resumed):
    """A resume that ignored the checkpoint would retrain from epoch 0 (and, seeded per epoch, end the same)."""
    r = killed_and_resumed
    assert trained_epochs(csv_rows(r["full"])) == list(range(EPOCHS))
    before = r["rows_before"]
    # Rows the killed process wrote (kept when the resumed run continues its metrics.csv) are not the resumed
    # process's: a retrained epoch would be a new row (its own epoch_time_s), not one of these.
    written_by_resume = [row for row in csv_rows(r["killed"]) if row not in before]
    assert trained_epochs(written_by_resume) == list(range(r["saved_epoch"] + 1, EPOCHS))


@pytest.mark.system
@pytest.mark.subprocess
def test_resumed_run_reports_the_training_time_of_all_its_launches(killed_and_resumed):
    """wall_time_s of a resumed run = the killed launch's time up to its checkpoint + the resumed launch's."""
    r = killed_and_resumed
    wall = json.loads((r["killed"] / "metrics.json").read_text())["wall_time_s"]
    epoch_times = [float(row["epoch_time_s"]) for row in csv_rows(r["killed"])
                   if row not in r["rows_before"] and row.get("epoch_time_s")]
    assert epoch_times and r["saved_clock"] > 0
    assert wall >= r["saved_clock"] + sum(epoch_times)
    final = torch.load(r["killed"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert r["saved_clock"] < final["callbacks"]["FitClock"]["elapsed_s"] <= wall


@pytest.mark.system
@pytest.mark.subprocess
def test_resume_argv_and_refusals(tmp_path, killed_and_resumed):
    run = tmp_path / "run"
    with pytest.raises(ResumeError, match="no such directory"):
        expand_argv(["train.py", f"resume={run}"])
    run.mkdir(parents=True)
    overrides = ["model=model_a", "optim.lr=0.1", "ckpt_path=old", "data.root=/elsewhere", "data.cache_dir=/elsewhere"]
    (run / "identity.json").write_text(json.dumps({"format": 2, "settings": {}, "overrides": overrides, "data": "x",
                                                   "inputs": "y", "fit": [], "precision": "32-true", "cwd": "/"}))
    # no checkpoint yet: the run is started again in its folder, from no checkpoint
    assert expand_argv(["train.py", f"resume={run}"]) == ["train.py", "model=model_a", "optim.lr=0.1",
                                                          f"hydra.run.dir='{run}'", "hydra.mode=RUN"]
    (run / "checkpoints").mkdir()
    shutil.copy(killed_and_resumed["full"] / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    with pytest.raises(ResumeError, match=r"hydra.run.dir=x is set by resume itself"):
        expand_argv(["train.py", f"resume={run}", "hydra.run.dir=x"])
    argv = expand_argv(["train.py", f"resume={run}", "print_config=false", "trainer.max_epochs=400"])
    assert argv == ["train.py", "model=model_a", "optim.lr=0.1", "print_config=false", "trainer.max_epochs=400",
                    f"ckpt_path='{run / 'checkpoints' / 'last.ckpt'}'", f"hydra.run.dir='{run}'", "hydra.mode=RUN"]
    (run / "metrics.json").write_text('{"status": "ok"}')
    with pytest.raises(ResumeError, match="already finished"):
        expand_argv(["train.py", f"resume={run}"])
    assert expand_argv(["train.py", "model=model_a"]) == ["train.py", "model=model_a"]


@pytest.mark.parametrize("saved, before", [(12.5, 12.5), (float("nan"), 0.0), (float("inf"), 0.0), (-3.0, 0.0),
                                           ("12", 0.0), (True, 0.0), (None, 0.0)])
def test_fit_clock_takes_only_a_finite_time_from_a_checkpoint(saved, before):
    clock = FitClock()
    clock.load_state_dict({"elapsed_s": saved})
    assert clock.before == before and clock.elapsed() == before  # not started: nothing of this launch yet
