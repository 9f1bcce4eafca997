"""The GPU path, exercised on this CPU: the Trainer settings resolved for CUDA (CUDA mocked), bf16 autocast
through the module, the metrics and the non-finite-loss guard, and torch.compile, through the real CLI."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch
from torch import nn

from allconv import training
from allconv.lightning_private import HydraJobDDPStrategy
from conftest import TINY, only_line, write_npz


@pytest.fixture
def cuda_available(monkeypatch):
    """What trainer_kwargs sees on a CUDA machine (nothing here is run on a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_trainer_settings_resolved_for_cuda(compose_cfg, cuda_available):
    t = training.trainer_kwargs(compose_cfg())  # the default: accelerator auto, precision auto, benchmark auto
    assert (t["accelerator"], t["precision"], t["benchmark"]) == ("auto", "bf16-mixed", True)
    gpu = training.trainer_kwargs(compose_cfg("trainer=gpu"))
    assert (gpu["accelerator"], gpu["precision"], gpu["benchmark"]) == ("gpu", "bf16-mixed", True)
    ddp = training.trainer_kwargs(compose_cfg("trainer=ddp"))
    assert isinstance(ddp["strategy"], HydraJobDDPStrategy)
    assert (ddp["devices"], ddp["precision"], ddp["benchmark"]) == ("auto", "bf16-mixed", True)
    cpu = training.trainer_kwargs(compose_cfg("trainer=cpu"))  # asked for the CPU: fp32, no cuDNN
    assert (cpu["accelerator"], cpu["precision"], cpu["benchmark"]) == ("cpu", "32-true", False)


def test_trainer_settings_without_cuda(compose_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    t = training.trainer_kwargs(compose_cfg())
    assert (t["precision"], t["benchmark"]) == ("32-true", False)
    assert t["limit_val_batches"] == 0  # no split, no validation loop (the paper's protocol)


class DtypeProbe(L.Callback):
    """The dtype of the class layer's output in each stage, and of the loss the training step returns."""

    def __init__(self):
        self.seen: dict[str, set] = {}

    def setup(self, trainer, pl_module, stage):
        layer = [m for m in pl_module.net.modules() if isinstance(m, nn.Conv2d)][-1]
        layer.register_forward_hook(lambda m, i, o: self.seen.setdefault(
            "train" if trainer.training else "test", set()).add(o.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.setdefault("loss", set()).add(outputs["loss"].dtype)


def test_bf16_autocast_reaches_the_network(compose_cfg, tmp_path):
    data = write_npz(tmp_path / "data.npz", n_train=32, n_test=16)
    cfg = compose_cfg(*TINY, "data=npz", f"data.path={data}", "data.preprocess=standardize", "logger=none",
                      "trainer.precision=bf16-mixed", "+trainer.max_steps=2", "callbacks.checkpoint.every_n_epochs=0")
    L.seed_everything(0, verbose=False)
    module = training.build_module(cfg)
    probe = DtypeProbe()
    trainer = training.build_trainer(cfg, tmp_path / "run", [probe], False)
    dm = training.build_datamodule(cfg)
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    assert probe.seen == {"train": {torch.bfloat16}, "test": {torch.bfloat16}, "loss": {torch.float32}}
    assert all(p.dtype == torch.float32 for p in module.parameters())  # mixed: the weights stay fp32
    assert 0.0 <= float(trainer.callback_metrics["test/error"]) <= 1.0


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("gpu-path") / "data.npz", n_train=48, n_test=16)


def fractions_of(value: float, n: int) -> bool:
    return abs(value * n - round(value * n)) < 1e-4


@pytest.mark.subprocess
def test_cli_bf16_run_and_its_metrics(run_train, tmp_path, tiny_data):
    run = tmp_path / "run"
    rc, out, err = run_train(*TINY, "data=npz", f"data.path={tiny_data}", "data.preprocess=standardize",
                             "trainer.precision=bf16-mixed", "trainer.max_epochs=2", "data.val_size=8",
                             "logger=csv", f"hydra.run.dir={run}")
    assert rc == 0, err[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "finished" and m["precision"] == "bf16-mixed" and m["epochs"] == 2
    assert fractions_of(m["test_error"], 16) and fractions_of(m["val_error"], 8)
    rows = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("train/loss")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(math.isfinite(float(r["train/loss"])) and 0 <= float(r["train/acc"]) <= 1 for r in rows)


@pytest.mark.subprocess
def test_cli_bf16_non_finite_loss_is_caught(run_train, tmp_path, tiny_data):
    run = tmp_path / "run"
    rc, out, err = run_train(*TINY, "data=npz", f"data.path={tiny_data}", "data.preprocess=standardize",
                             "trainer.precision=bf16-mixed", "optim.lr=1e30", "optim.max_update_norm=null",
                             "logger=none", f"hydra.run.dir={run}")
    assert rc == 1, (rc, err[-3000:])
    assert only_line(err).startswith("error: non-finite loss at epoch 0")
    assert json.loads((run / "metrics.json").read_text())["status"] == "diverged"


@pytest.mark.system
@pytest.mark.subprocess
def test_cli_compiled_network(run_train, tmp_path, tiny_data):
    """model.compile=true: torch.compile (inductor, C++ on the CPU) trains, tests and saves plain weights."""
    run = tmp_path / "run"
    rc, out, err = run_train(*TINY, "data=npz", f"data.path={tiny_data}", "data.preprocess=standardize",
                             "model.compile=true", "logger=none", f"hydra.run.dir={run}", timeout=280)
    assert rc == 0, err[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "finished" and fractions_of(m["test_error"], 16)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state and not any("_orig_mod" in k for k in state)  # the weights once, under their own names
    assert all(k.startswith("net.") for k in state)
