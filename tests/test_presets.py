"""The presets a lightning-hydra-template user reaches for: callbacks=none, callbacks=early_stopping (off the
paper's recipe, needs a validation split), trainer=ddp_sim (2 CPU processes) and trainer=mps (refused where
there is no MPS)."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, run_cli, write_npz

# Lightning and allconv are imported in the tests: collecting this file stays cheap (tests/test_test_selection.py).


def test_callbacks_none_is_checkpointing_only(compose_cfg, tmp_path):
    from lightning.pytorch.callbacks import ProgressBar

    from allconv.callbacks import LastCheckpoint, build_callbacks

    cfg = compose_cfg("callbacks=none")
    built = build_callbacks(cfg, tmp_path)
    assert any(isinstance(c, LastCheckpoint) for c in built)
    assert not any(isinstance(c, ProgressBar) for c in built)
    names = {type(c).__name__ for c in built}
    assert "GuidedBackpropGrid" not in names and "EarlyStopping" not in names, names
    assert cfg.callbacks.guided_backprop.filters is False
    default = {type(c).__name__ for c in build_callbacks(compose_cfg(), tmp_path)}
    assert {"RichProgressBar", "GuidedBackpropGrid"} <= default  # what none takes away


def test_early_stopping_is_off_by_default_and_a_preset(compose_cfg, tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    from allconv.callbacks import build_callbacks

    assert "early_stopping" not in compose_cfg().callbacks
    cfg = compose_cfg("callbacks=early_stopping", "data.val_size=5000", "callbacks.early_stopping.patience=3")
    (stop,) = [c for c in build_callbacks(cfg, tmp_path) if isinstance(c, EarlyStopping)]
    assert (stop.monitor, stop.patience, stop.mode) == ("val/error", 3, "min")


@pytest.mark.parametrize("overrides, message", [
    (["callbacks=early_stopping"], "error: callbacks=early_stopping watches val/error: it needs a validation split, "
                                   "data.val_size > 0"),
    (["callbacks=early_stopping", "data.val_size=32", "callbacks.early_stopping.patience=0"],
     "error: callbacks.early_stopping.patience=0: must be a whole number >= 1"),
    (["trainer=mps"], "error: trainer.accelerator=mps, trainer.devices=1, trainer.num_nodes=1, trainer.strategy=auto, "
                      "trainer.precision=32-true: `MPSAccelerator` can not run on your system"),  # Lightning's words
])
def test_refused_in_one_line(run_entry, tmp_path, overrides, message):
    import torch

    if "trainer=mps" in overrides and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    data = write_npz(tmp_path / "data.npz", n_train=128, n_test=32)
    run = tmp_path / "run"
    quiet = [o for o in TINY if not o.startswith("trainer.accelerator")]  # the preset's own accelerator
    code, out, err = run_entry(*quiet, "data=npz", f"data.path={data}", f"hydra.run.dir={run}", *overrides)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(message), err
    assert not run.exists()


@pytest.mark.subprocess
def test_early_stopping_stops_the_fit(tmp_path):
    """min_delta 1 is an improvement no error can make: the first epoch sets the best, the next one stops."""
    data = write_npz(tmp_path / "data.npz", n_train=128, n_test=32)
    run = tmp_path / "run"
    rc, out, err = run_cli(*TINY, "model.width=0.05", "data=npz", f"data.path={data}", "data.val_size=32",
                           "data.preprocess=standardize",
                           "trainer.max_epochs=6", "callbacks=early_stopping", "callbacks.early_stopping.patience=1",
                           "callbacks.early_stopping.min_delta=1.0", "logger=none", f"hydra.run.dir={run}",
                           cwd=tmp_path)
    assert rc == 0, err[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs"] == 2, metrics
    assert metrics["stopped_by"] == "a callback (trainer.should_stop)"


def test_ddp_sim_is_two_cpu_processes_with_the_projects_ddp(compose_cfg):
    t = compose_cfg("trainer=ddp_sim").trainer
    assert (t.accelerator, t.devices, t.strategy, t.precision) == ("cpu", 2, "ddp", "32-true")


@pytest.mark.system
@pytest.mark.subprocess
def test_ddp_sim_runs_two_ranks(tmp_path):
    data = write_npz(tmp_path / "data.npz", n_train=128, n_test=32)
    run = tmp_path / "run"
    rc, out, err = run_cli(*TINY, "trainer=ddp_sim", "data=npz", f"data.path={data}", "data.batch_size=32",
                           "data.preprocess=standardize",
                           "logger=none", f"hydra.run.dir={run}", cwd=tmp_path)
    assert rc == 0, err[-3000:]
    ddp = json.loads((run / "metrics.json").read_text())["ddp"]
    assert ddp["world_size"] == 2 and ddp["weights_identical"]
