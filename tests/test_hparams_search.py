"""hparams_search=optuna_lr end to end: real Hydra, real Optuna, the study in the sweep folder's SQLite file.

A study of 3 trials relaunched with n_trials=5 trains only trials 3 and 4 (the first three folders untouched); a
trial killed mid-run is continued from its own last.ckpt by the next launch; a failing trial is FAIL in the study
and the sweep exits 1 naming it; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from allconv import report
from conftest import PYTHON, TRAIN_PY, last_line, run_cli, write_npz

TINY = ["hparams_search=optuna_lr", "data=npz", "data.preprocess=standardize", "model.width=0.05",
        "trainer.max_epochs=1", "data.batch_size=32", "data.val_size=32", "logger=csv", "callbacks.progress_bar=none",
        "trainer.enable_progress_bar=false", "print_config=false", "callbacks.guided_backprop.every_n_epochs=0",
        "callbacks.guided_backprop.filters=false"]


def tiny(tmp: Path, n_train: int = 128) -> list[str]:
    data = write_npz(tmp / "data.npz", n_train=n_train, n_test=32)
    return [*TINY, f"data.path={data}", f"data.cache_dir={tmp / 'zca'}"]


def trials(sweep: Path) -> list[tuple[int, str]]:
    """(number, state) of every trial, read from the study's own SQLite file."""
    with sqlite3.connect(sweep / "optuna.db") as db:
        return db.execute("SELECT number, state FROM trials ORDER BY number").fetchall()


def folders(sweep: Path) -> list[str]:
    return sorted(p.name for p in sweep.iterdir() if p.is_dir())


def snapshot(sweep: Path) -> dict[str, tuple[int, bytes]]:
    return {p.parent.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sweep.glob("*/metrics.json")}


@pytest.fixture(scope="module")
def relaunched(tmp_path_factory):
    """3 trials, then the same command with n_trials=5."""
    tmp = tmp_path_factory.mktemp("optuna")
    sweep = tmp / "sweep"
    base = ["-m", *tiny(tmp), f"hydra.sweep.dir={sweep}"]
    rc, out, err = run_cli(*base, "hydra.sweeper.n_trials=3", cwd=tmp)
    assert rc == 0, err[-3000:]
    first = {"trials": trials(sweep), "folders": folders(sweep), "metrics": snapshot(sweep)}
    rc, out, err = run_cli(*base, "hydra.sweeper.n_trials=5", cwd=tmp)
    assert rc == 0, err[-3000:]
    return {"sweep": sweep, "first": first, "out": out, "err": err, "args": base}


@pytest.mark.system
@pytest.mark.subprocess
def test_first_launch_is_three_complete_trials_in_three_run_folders(relaunched):
    first = relaunched["first"]
    assert first["trials"] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert [name.split("_")[0] for name in first["folders"]] == ["0", "1", "2"]
    for name in first["folders"]:  # ordinary run folders: everything a run has
        run = relaunched["sweep"] / name
        for part in ("metrics.json", "checkpoints/last.ckpt", "csv/metrics.csv",
                     "identity.json", "learning_curve.png"):
            assert (run / part).is_file(), run / part


@pytest.mark.system
@pytest.mark.subprocess
def test_relaunch_with_more_trials_trains_only_the_new_ones(relaunched):
    sweep, first = relaunched["sweep"], relaunched["first"]
    assert trials(sweep) == [(n, "COMPLETE") for n in range(5)]
    now = folders(sweep)
    assert len(now) == 5 and now[:3] == first["folders"]  # trial number == job number: the same folders
    after = snapshot(sweep)
    for name, (mtime, data) in first["metrics"].items():
        assert after[name] == (mtime, data), f"{name} was trained again"
    assert "trial 3 (optim.lr=" in relaunched["err"] and "trial 0 (" not in relaunched["err"]


@pytest.mark.system
@pytest.mark.subprocess
def test_each_trial_folder_holds_its_trials_lr_and_objective(relaunched):
    sweep = relaunched["sweep"]
    with sqlite3.connect(sweep / "optuna.db") as db:
        rows = db.execute("SELECT t.number, p.param_value, v.value FROM trials t JOIN trial_params p USING (trial_id) "
                          "JOIN trial_values v USING (trial_id) ORDER BY t.number").fetchall()
    assert len(rows) == 5
    for number, lr, value in rows:
        (folder,) = sweep.glob(f"{number}_*")
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["lr"] == pytest.approx(lr, rel=1e-12) and 0.005 <= lr <= 0.3
        assert metrics["val_error"] == pytest.approx(value)  # the preset minimises the validation error


@pytest.mark.system
@pytest.mark.subprocess
def test_report_and_plot_of_the_study(relaunched, tmp_path):
    sweep = relaunched["sweep"]
    assert (sweep / "optuna.png").stat().st_size > 5000
    assert "best of 5 complete trials" in relaunched["out"]
    assert report.main([str(sweep), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "5 run folders: 5 finished" in text and "| All-CNN-C |" in text
    assert report.main([str(sweep), "--curves", "--out", str(tmp_path)]) == 0  # one row per trial
    assert (tmp_path / "curves.md").read_text().count("(cap 0.125)") == 5


@pytest.mark.system
@pytest.mark.subprocess
def test_a_relaunch_with_other_settings_is_refused(relaunched):
    """Trials of one study share its settings, by the rule a continued run follows: other epochs are refused,
    another progress bar is not a difference."""
    sweep = relaunched["sweep"]
    before = (sweep / "optuna.db").read_bytes(), snapshot(sweep)
    rc, out, err = run_cli(*relaunched["args"], "hydra.sweeper.n_trials=5", "trainer.max_epochs=2", cwd=sweep.parent)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err[-3000:]
    assert "was started with other settings (trainer.max_epochs 1 vs 2)" in err
    assert ((sweep / "optuna.db").read_bytes(), snapshot(sweep)) == before
    rc, out, err = run_cli(*relaunched["args"], "hydra.sweeper.n_trials=5", "callbacks.progress_bar=tqdm",
                           cwd=sweep.parent)
    assert rc == 0 and "trial" not in err.replace("complete trials", ""), err[-3000:]  # nothing to train


@pytest.mark.system
@pytest.mark.subprocess
def test_killed_trial_continues_from_its_checkpoint(tmp_path):
    """SIGKILL while trial 1 trains its second epoch: it stays RUNNING; the next launch runs it again as job 1
    in the same folder, from that folder's last.ckpt, and the study then holds 2 COMPLETE trials."""
    sweep = tmp_path / "sweep"
    args = ["-m", *tiny(tmp_path, n_train=320), "trainer.max_epochs=3", f"hydra.sweep.dir={sweep}",
            "hydra.sweeper.n_trials=2"]
    victim = subprocess.Popen([PYTHON, str(TRAIN_PY), *args], cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(sweep.glob("1_*/checkpoints/last.ckpt")) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert trials(sweep) == [(0, "COMPLETE"), (1, "RUNNING")]
    (killed,) = sweep.glob("1_*")
    assert not (killed / "metrics.json").exists()

    rc, out, err = run_cli(*args, cwd=tmp_path)
    assert rc == 0, err[-3000:]
    assert "optuna: continuing 1 interrupted trial(s): 1" in err
    assert f"{killed}: continuing from checkpoints/last.ckpt" in err
    assert trials(sweep) == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert folders(sweep) == sorted([killed.name, next(sweep.glob("0_*")).name])
    assert json.loads((killed / "metrics.json").read_text())["epochs"] == 3


@pytest.mark.subprocess
def test_failed_trial_is_fail_in_the_study_and_the_sweep_exits_1(tmp_path):
    sweep = tmp_path / "sweep"
    rc, out, err = run_cli("-m", *tiny(tmp_path), f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=1",
                           "optim.lr=tag(log, interval(1e29, 1e30))", cwd=tmp_path)
    assert rc == 1
    line = last_line(err)
    assert line.startswith("error: 1 of 1 trials failed: job 0 (0_all_cnn_c_lr") and "non-finite loss" in line, line
    assert trials(sweep) == [(0, "FAIL")]


@pytest.mark.parametrize("override, message", [
    ("hydra.sweeper.sampler=banana", "error: hydra.sweeper.sampler='banana' is not a sampler here; allowed: tpe, "
                                     "random, qmc"),
    ("hydra.sweeper.n_trials=0", "error: hydra.sweeper.n_trials=0 is not allowed; give an integer >= 1"),
    ("optim.lrr=tag(log, interval(0.01, 0.1))", "error: Could not override 'optim.lrr'"),
    ("optim.lr=interval(0, 0.1)", "error: optim.lr=0.0: must be a positive number"),  # checked at both ends
    ("optim.lr=interval(0.1, 0.01)", "error: optim.lr: interval(0.1, 0.01) is empty"),
    ("hydra.sweeper.objective=loss", "error: hydra.sweeper.objective='loss' is not allowed; allowed: test_error, "
                                     "val_error"),
    ("data.val_size=0", "error: hydra.sweeper.objective=val_error needs a validation split"),
])
def test_bad_input_is_one_line_and_writes_nothing(run_entry, tmp_path, override, message):
    sweep = tmp_path / "sweep"
    data = write_npz(tmp_path / "data.npz", n_train=128, n_test=32)
    code, out, err = run_entry("-m", *TINY, f"data.path={data}", f"hydra.sweep.dir={sweep}", override)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.strip().startswith(message), err
    assert not sweep.exists()


@pytest.mark.parametrize("damage", ["text", "link", "fifo", "other_sqlite"])
def test_a_damaged_or_linked_study_file_is_refused_in_one_line(run_entry, tmp_path, damage):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    db = sweep / "optuna.db"
    outside = tmp_path / "elsewhere.db"
    if damage == "text":
        db.write_bytes(b"not a database\n" * 10)
    elif damage == "link":
        outside.write_bytes(b"")
        db.symlink_to(outside)
    elif damage == "fifo":
        os.mkfifo(db)
    else:  # an SQLite file, but not Optuna's
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE trials (x INTEGER)")
    before = sorted(p.name for p in sweep.iterdir())
    data = write_npz(tmp_path / "data.npz", n_train=128, n_test=32)
    code, out, err = run_entry("-m", *TINY, f"data.path={data}", f"hydra.sweep.dir={sweep}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(db) in err, err
    assert sorted(p.name for p in sweep.iterdir()) == before
    if damage == "link":
        assert outside.read_bytes() == b""  # never opened through the link


def test_another_search_space_on_the_same_study_is_refused(run_entry, tmp_path):
    """The study records its space: trials of two spaces in one study are not one search."""
    import optuna

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{sweep / 'optuna.db'}", study_name="optuna_lr")
    study.set_user_attr("space", '{"optim.lr": "another"}')
    study.set_user_attr("objective", "val_error")
    data = write_npz(tmp_path / "data.npz", n_train=128, n_test=32)
    code, out, err = run_entry("-m", *TINY, f"data.path={data}", f"hydra.sweep.dir={sweep}")
    assert code == 2 and "was started with space" in err and len(err.strip().splitlines()) == 1, err
    assert not (sweep / "multirun.yaml").exists()

