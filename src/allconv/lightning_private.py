"""Every place allconv overrides or patches a private name of Lightning (or of its W&B logger).

Six things need it: a last.ckpt every epoch (ModelCheckpoint's internals), Lightning's SLURM auto-requeue
turned off (its cluster environment), DDP ranks that relaunch
one Hydra job instead of the whole command line (the subprocess launcher's command), a W&B
logger without the argument wandb deprecated, and, for the configuration schema, Lightning's list of
precision names and its reading of accelerator/devices/strategy/precision without building a Trainer.
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


def disable_slurm_auto_requeue(trainer) -> None:
    """Turn off Lightning's SLURM auto-requeue for this trainer (call before fit registers its signal handlers).

    With SLURMEnvironment(auto_requeue=True), Lightning's default under SLURM, SIGUSR1 saves
    hpc_ckpt_<n>.ckpt from inside its signal handler (mid-step: the resumed run ends one step short of an
    uninterrupted one) and requeues; callbacks.Preemption handles SIGUSR1 like SIGTERM instead.
    Private: Trainer._accelerator_connector.cluster_environment (the object the signal connector reads).
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment):
        environment.auto_requeue = False


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


def precision_names() -> tuple:
    """Every precision value Lightning's Trainer accepts (private: fabric.connector._PRECISION_INPUT_*)."""
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT_INT, _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    return (*typing.get_args(_PRECISION_INPUT_STR), *typing.get_args(_PRECISION_INPUT_STR_ALIAS),
            *typing.get_args(_PRECISION_INPUT_INT))


def check_trainer_settings(**settings) -> None:
    """Raise what Trainer(**settings) would raise about these devices settings, without building a Trainer or
    launching anything (private: the trainer's _AcceleratorConnector)."""
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    _AcceleratorConnector(**settings)
