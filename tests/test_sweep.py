"""Hydra multiruns end to end on CPU: a 2 x 2 grid with a metrics.json per job and the report over it,
a diverging job recorded as failed while the others finish, bad sweeps refused in one line, and the
paper_grid preset's 48 jobs. Other launchers: tests/test_launchers.py; W&B sweep agents: tests/test_wandb.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from allconv import cli, report
from allconv.report import runs, table
from conftest import CONF, last_line, run_cli, write_npz

TINY = ["data=npz", "data.preprocess=standardize", "model.width=0.125", "trainer.max_epochs=1", "data.batch_size=32",
        "logger=none", "callbacks.progress_bar=none", "trainer.enable_progress_bar=false", "print_config=false",
        "callbacks.guided_backprop.every_n_epochs=0", "callbacks.checkpoint.every_n_epochs=0"]


def tiny(tmp: Path) -> list[str]:
    data = write_npz(tmp / "data.npz", n_train=128, n_test=32)
    return [*TINY, f"data.path={data}", f"data.cache_dir={tmp / 'zca'}"]


def jobs(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))}


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """2 networks x 2 learning rates; lr 1e30 diverges at its first steps, as lr 0.25 can in the paper's grid."""
    tmp = tmp_path_factory.mktemp("grid")
    sweep = tmp / "sweep"
    rc, out, err = run_cli("-m", *tiny(tmp), "model=model_a,all_cnn_c", "optim.lr=0.05,1e30",
                           f"hydra.sweep.dir={sweep}", cwd=tmp)
    # every job ran; the sweep then ends non-zero and names the failed ones
    assert rc == 1, err[-3000:]
    line = last_line(err)
    assert line.startswith("error: 2 of 4 jobs failed: job 1 (1_model_a_lr1e+30_s0): non-finite loss"), line
    assert "; job 3 (3_all_cnn_c_lr1e+30_s0): non-finite loss" in line
    return sweep


@pytest.mark.subprocess
def test_2x2_multirun_one_metrics_json_per_job_failed_jobs_recorded(grid):
    found = jobs(grid)
    assert sorted(found) == ["0_model_a_lr0.05_s0", "1_model_a_lr1e+30_s0", "2_all_cnn_c_lr0.05_s0",
                             "3_all_cnn_c_lr1e+30_s0"]
    for name, m in found.items():
        assert name.endswith(f"{m['model']}_lr{m['lr']}_s0")
        if m["lr"] == 1e30:  # recorded as failed, and the next job still ran
            assert m["status"] == "diverged" and "non-finite loss" in m["error"]
        else:
            assert m["status"] == "finished" and 0 <= m["test_error"] <= 1 and m["epochs"] == 1
    assert (grid / "multirun.yaml").is_file()


@pytest.mark.subprocess
def test_report_over_the_multirun(grid, tmp_path):
    assert report.main([str(grid), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "| Model A | 0.05 (of 1) |" in text and "| All-CNN-C | 0.05 (of 1) |" in text and table.ON_TEST in text
    assert "2 finished, 2 failed or incomplete, 0 grid cells missing" in text
    assert text.count("| diverged | non-finite loss") == 2
    assert (tmp_path / "report.png").stat().st_size > 5000


@pytest.mark.subprocess
@pytest.mark.parametrize("override, message", [
    ("model=glob(nomatch*)", "error: model: the sweep matches no value; give at least one"),
    ("optim.lrr=0.1,0.05", "error: Could not override 'optim.lrr'"),
])
def test_bad_sweeps_are_one_line_errors(tmp_path, override, message):
    sweep = tmp_path / "sweep"
    rc, out, err = run_cli("-m", *tiny(tmp_path), override, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and last_line(err).startswith(message), err
    assert not sweep.exists()


def test_paper_grid_preset_is_the_48_runs():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=paper_grid", "seed=1"], return_hydra_config=True)
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"  # no -m needed
        assert dict(cfg.hydra.sweeper.params) == {"model": "glob(*)", "optim.lr": "0.25,0.1,0.05,0.01"}
        # the jobs as the launcher composes them (what the pre-flight checks before the first starts)
        jobs = [(j.hydra.runtime.choices.model, j.optim.lr, j.seed) for j in cli.job_configs(cfg)]
    assert len(jobs) == len(set(jobs)) == 48
    assert {m for m, _, _ in jobs} == set(runs.REFERENCE) and {lr for _, lr, _ in jobs} == {0.25, 0.1, 0.05, 0.01}
    assert {s for _, _, s in jobs} == {1}
