"""src/eval.py end to end: it re-tests a trained run's checkpoint and gets the run's own test error; a
missing, unsafe or mismatched checkpoint ends with one line on stderr, exit status 2, no eval.json and every
file as it was (refusals run the entry point in this process, see conftest.run_entry)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import REPO, TINY, only_line, run_cli, write_npz

EVAL_PY = REPO / "src" / "eval.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny All-CNN-C run (GCN + ZCA, as the paper): its folder."""
    root = tmp_path_factory.mktemp("trained")
    data = write_npz(root / "data.npz", n_train=48, n_test=20)
    run = root / "run"
    rc, out, err = run_cli(*TINY, "data=npz", f"data.path={data}", "logger=none", f"hydra.run.dir={run}", cwd=root)
    assert rc == 0, err[-3000:]
    return run


def eval_args(tmp_path, ckpt):
    return [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}", "trainer.enable_progress_bar=false"]


@pytest.mark.subprocess
def test_eval_reproduces_the_runs_test_error(trained, tmp_path):
    rc, out, err = run_cli(*eval_args(tmp_path, trained / "checkpoints" / "last.ckpt"), cwd=tmp_path, script=EVAL_PY)
    assert rc == 0, err[-3000:]
    metrics = json.loads((trained / "metrics.json").read_text())
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["model"] == metrics["model"] == "all_cnn_c"
    assert result["test_error"] == pytest.approx(metrics["test_error"], abs=1e-6)
    assert f"test error {metrics['test_error']:.4f}" in out


def rejected(run_entry, tmp_path, ckpt) -> str:
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    rc, out, err = run_entry(*eval_args(tmp_path, ckpt), script=EVAL_PY)
    assert rc == 2, (rc, out[-2000:], err[-3000:])
    line = only_line(err)
    assert line.startswith("error: ") and str(ckpt) in line, line
    assert not (tmp_path / "eval" / "eval.json").exists() and "test error" not in out
    assert {p: p.read_bytes() for p in before} == before  # the checkpoint and everything else untouched
    return line


def test_missing_checkpoint(run_entry, tmp_path):
    line = rejected(run_entry, tmp_path, tmp_path / "no_such_run" / "last.ckpt")
    assert "does not exist" in line


def _retarget(hp, family):
    """Every `family` entry of the saved hyperparameters (wherever the run config keeps the model) -> family."""
    if isinstance(hp, dict):
        return {k: family if k == "family" else _retarget(v, family) for k, v in hp.items()}
    return hp


def test_checkpoint_of_another_model(run_entry, trained, tmp_path):
    """All-CNN-C's weights under a checkpoint that says it is an All-CNN-A: the weights don't fit."""
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"] = _retarget(ckpt["hyper_parameters"], "a")
    forged = tmp_path / "forged.ckpt"
    torch.save(ckpt, forged)
    line = rejected(run_entry, tmp_path, forged)
    assert "match" in line


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoint_that_would_run_code_is_refused_unrun(run_entry, tmp_path):
    marker = tmp_path.parent / f"{tmp_path.name}-code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Planted(str(marker))}, evil)
    line = rejected(run_entry, tmp_path, evil)
    assert not marker.exists()  # the pickle's os.mkdir was never called
    assert "refused" in line or "not an allconv checkpoint" in line, line
