"""Every place allconv overrides or reads a private name of Lightning (or of its W&B logger).

Five things need one, for want of a public form: a last.ckpt every epoch (ModelCheckpoint's internals), DDP ranks
that relaunch one Hydra job instead of the whole command line (the subprocess launcher's command), a W&B logger
without the argument wandb deprecated (wandb prints that warning itself, on stderr, where no warnings filter
reaches), the logging step a checkpoint resumes at (for TensorBoard's purge marker), and, for the configuration
schema, Lightning's reading of accelerator/devices/strategy/precision without building a Trainer. The precision
names are a copy of Lightning's private list, compared with it by the tests.
Each private name used here is checked by tests/test_lightning_private.py, which fails when Lightning
changes it; pyproject.toml pins lightning to the range tested (2.6.x).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import subprocess_script


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt every n epochs, nothing else.

    Lightning 2.6's ModelCheckpoint(save_top_k=0, save_last=True) writes last.ckpt only in a step
    where it also wrote a top-k file, i.e. only at the end of fit: a killed run had nothing to resume.
    Private: _should_skip_saving_checkpoint, _every_n_epochs, _save_last_checkpoint, _monitor_candidates.
    """

    def on_train_epoch_end(self, trainer, pl_module):
        if self._should_skip_saving_checkpoint(trainer):
            return
        if self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module):
        pass  # saved at the end of the training epoch, after the module has checked the loss


class _HydraJobLauncher(subprocess_script._SubprocessScriptLauncher):
    """Starts ranks 1..N-1 with ddp.hydra_job_command instead of Lightning's Hydra command (the whole sweep).

    Private: _SubprocessScriptLauncher._call_children_scripts, subprocess_script._hydra_subprocess_cmd.
    """

    def _call_children_scripts(self) -> None:
        from allconv import ddp

        ddp.remember_launch_env()
        original = subprocess_script._hydra_subprocess_cmd
        subprocess_script._hydra_subprocess_cmd = ddp.hydra_job_command  # used only inside this call
        try:
            super()._call_children_scripts()
        finally:
            subprocess_script._hydra_subprocess_cmd = original


class HydraJobDDPStrategy(DDPStrategy):
    """DDPStrategy whose script launcher restarts this Hydra job, not the command line.

    Private: DDPStrategy._configure_launcher, ._launcher.
    """

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is subprocess_script._SubprocessScriptLauncher:
            self._launcher = _HydraJobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


class QuietWandbLogger(WandbLogger):
    """WandbLogger without the `anonymous` argument, which wandb deprecated and Lightning still passes.

    Private: WandbLogger._wandb_init (the kwargs of wandb.init), ._experiment (the run, None until started).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous", None)

    @property
    def started_run(self):
        """The W&B run if one was started, else None (without starting one, as .experiment would)."""
        return self._experiment

    def forget_run(self) -> None:
        self._experiment = None


# Every precision value Lightning's Trainer accepts: its own lists (fabric.connector._PRECISION_INPUT_STR,
# _STR_ALIAS, _INT) are private, so this is a copy that tests/test_lightning_private.py compares with them.
PRECISION_NAMES = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true",
                   "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16", 64, 32, 16)


def precision_names() -> tuple:
    return PRECISION_NAMES


def logging_step(ckpt: dict) -> int | None:
    """The logging step at which a run resumed from this checkpoint takes over: the batches it had trained.

    Lightning logs with the count of training batches, which the checkpoint keeps as the fit loop's
    _batches_that_stepped (private); global_step counts optimizer steps, the same count while one optimizer steps
    once a batch, and is the answer for a checkpoint without the loop's state. None if neither is a count.
    """
    step = ckpt
    for key in ("loops", "fit_loop", "epoch_loop.state_dict", "_batches_that_stepped"):
        step = step.get(key) if isinstance(step, dict) else None
    step = ckpt.get("global_step") if step is None else step
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def check_trainer_settings(**settings) -> None:
    """Raise what Trainer(**settings) would raise about these devices settings, without building a Trainer or
    launching anything (private: the trainer's _AcceleratorConnector)."""
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    _AcceleratorConnector(**settings)
