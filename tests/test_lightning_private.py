"""The private Lightning names allconv.lightning_private relies on: still there, with the same shape.

If one of these fails after a Lightning upgrade, the override in allconv/lightning_private.py must be
revisited (and pyproject.toml's lightning pin moved only then).
"""

from __future__ import annotations

import inspect

import lightning
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import subprocess_script

from allconv import lightning_private as lp


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_lightning_is_in_the_pinned_range():
    major, minor = (int(x) for x in lightning.__version__.split(".")[:2])
    assert (major, minor) == (2, 6), lightning.__version__


def test_model_checkpoint_internals_used_by_last_checkpoint(tmp_path):
    assert params(ModelCheckpoint._should_skip_saving_checkpoint) == ["self", "trainer"]
    assert params(ModelCheckpoint._save_last_checkpoint) == ["self", "trainer", "monitor_candidates"]
    assert params(ModelCheckpoint._monitor_candidates) == ["self", "trainer"]
    cb = lp.LastCheckpoint(dirpath=str(tmp_path), save_last=True, save_top_k=0, every_n_epochs=3)
    assert cb._every_n_epochs == 3
    # The override exists because Lightning saves last.ckpt only beside a top-k file: still so?
    assert "_save_last_checkpoint" in inspect.getsource(ModelCheckpoint._save_topk_checkpoint) or \
        "_save_last_checkpoint" in inspect.getsource(ModelCheckpoint.on_train_epoch_end)


def test_subprocess_launcher_internals_used_for_ddp_in_hydra_jobs():
    assert params(subprocess_script._hydra_subprocess_cmd) == ["local_rank"]
    assert params(subprocess_script._SubprocessScriptLauncher._call_children_scripts) == ["self"]
    # The launcher must still build the children's command through the module-level function we swap.
    source = inspect.getsource(subprocess_script._SubprocessScriptLauncher._call_children_scripts)
    assert "_hydra_subprocess_cmd(" in source
    assert params(DDPStrategy._configure_launcher) == ["self"]
    strategy = lp.HydraJobDDPStrategy()
    assert hasattr(strategy, "_launcher")


def test_wandb_logger_internals(tmp_path):
    logger = lp.QuietWandbLogger(save_dir=str(tmp_path), mode="disabled", project="p")
    assert isinstance(logger._wandb_init, dict) and "anonymous" not in logger._wandb_init
    assert "anonymous" in WandbLogger(save_dir=str(tmp_path), mode="disabled", project="p")._wandb_init
    assert logger.started_run is None  # reading it does not start a run


def test_precision_names_and_the_accelerator_connector():
    names = lp.precision_names()
    assert {"32-true", "bf16-mixed", "16-mixed", "64-true", "32", 32, 16} <= set(names)
    lp.check_trainer_settings(accelerator="cpu", devices=1, precision="32-true")  # what the Trainer accepts
    with pytest.raises(ValueError):
        lp.check_trainer_settings(accelerator="cpu", devices=1, precision="banana")
