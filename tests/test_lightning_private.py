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
    assert names == lp.PRECISION_NAMES
    assert {"32-true", "bf16-mixed", "16-mixed", "64-true", "32", 32, 16} <= set(names)
    lp.check_trainer_settings(accelerator="cpu", devices=1, precision="32-true")  # what the Trainer accepts
    with pytest.raises(ValueError):
        lp.check_trainer_settings(accelerator="cpu", devices=1, precision="banana")


def test_precision_names_are_lightning_s_own_list():
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT_INT, _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    lightning_s = (*typing.get_args(_PRECISION_INPUT_STR), *typing.get_args(_PRECISION_INPUT_STR_ALIAS),
                   *typing.get_args(_PRECISION_INPUT_INT))
    assert lp.PRECISION_NAMES == lightning_s  # a name Lightning adds or drops fails here


def test_logging_step_is_where_lightning_logs_after_a_resume(tmp_path):
    """A module that steps its optimizers twice a batch: global_step counts the optimizer steps, the step Lightning
    logs at counts batches; the checkpoint's loop state (the private key logging_step reads) is the one to use."""
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.loggers import CSVLogger

    logged = []

    class Logger(CSVLogger):
        def log_metrics(self, metrics, step=None):
            logged.append(step)

    class TwoSteps(BoringModel):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            for _ in range(2):
                loss = self.step(batch)
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
            self.log("loss", loss, on_step=True)

    torch.manual_seed(0)
    trainer = Trainer(default_root_dir=str(tmp_path), max_epochs=1, limit_train_batches=3, log_every_n_steps=1,
                      logger=Logger(str(tmp_path)), enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(TwoSteps())
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and lp.logging_step(ckpt) == 3
    assert max(s for s in logged if s is not None) == lp.logging_step(ckpt) - 1  # batches 0, 1, 2
    assert lp.logging_step({"global_step": 4}) == 4  # no loop state: the optimizer's count
    assert lp.logging_step({"loops": {"fit_loop": {}}, "global_step": True}) is None
