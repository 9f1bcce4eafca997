"""Resume: a CPU run killed with SIGKILL mid-epoch continues with `train.py resume=<run dir>` and ends
with the same weights and metrics as an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from allconv.resume import ResumeError, expand_argv
from conftest import PYTHON, TRAIN_PY, run_cli, write_npz


def args(tmp_path, run):
    data = write_npz(tmp_path / "data.npz", n_train=320, n_test=32)
    return ["data=npz", f"data.path={data}", f"data.cache_dir={tmp_path / 'zca'}", "model.width=0.125",
            "trainer.max_epochs=3", "data.batch_size=32", "data.val_size=32", "logger=none",
            "callbacks.progress_bar=none", "trainer.enable_progress_bar=false", "print_config=false",
            "callbacks.guided_backprop.every_n_epochs=0", f"hydra.run.dir={run}"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = subprocess.Popen([PYTHON, str(TRAIN_PY), *args(tmp_path, full)], cwd=tmp_path, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([PYTHON, str(TRAIN_PY), *args(tmp_path, killed)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # end of epoch 0 just saved: now inside epoch 1
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] < 2

    rc, out, err = run_cli(f"resume={killed}", cwd=tmp_path)
    assert rc == 0, err[-3000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]

    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, killed))
    assert a["epochs"] == b["epochs"] == 3
    assert (a["test_error"], a["val_error"]) == (b["test_error"], b["val_error"])
    wa, wb = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
              for d in (full, killed))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_argv_and_refusals(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ResumeError, match="no such directory"):
        expand_argv(["train.py", f"resume={run}"])
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- model=model_a\n- optim.lr=0.1\n- ckpt_path=old\n")
    with pytest.raises(ResumeError, match="no checkpoints/last.ckpt"):
        expand_argv(["train.py", f"resume={run}"])
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    argv = expand_argv(["train.py", f"resume={run}", "trainer.max_epochs=400"])
    assert argv == ["train.py", "model=model_a", "optim.lr=0.1", "trainer.max_epochs=400",
                    f"ckpt_path='{run / 'checkpoints' / 'last.ckpt'}'", f"hydra.run.dir='{run}'", "hydra.mode=RUN"]
    (run / "metrics.json").write_text('{"status": "ok"}')
    with pytest.raises(ResumeError, match="already finished"):
        expand_argv(["train.py", f"resume={run}"])
    assert expand_argv(["train.py", "model=model_a"]) == ["train.py", "model=model_a"]
