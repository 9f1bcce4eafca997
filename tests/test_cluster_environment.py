"""Under SLURM a run's trainer has SLURMEnvironment(auto_requeue=False): SIGUSR1 is callbacks.Preemption's, and
Lightning installs no handler that saves hpc_ckpt_<n>.ckpt from inside a step. Elsewhere Lightning picks its own."""

from __future__ import annotations

import os
import signal

import pytest
from hydra import compose, initialize_config_dir
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

from allconv import training
from allconv.callbacks import cluster_plugins
from conftest import CONF

# What sbatch sets for a one-task job (not an interactive one: its name is not "bash" or "interactive").
SLURM_JOB = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "allconv", "SLURM_JOB_ID": "7", "SLURM_NODELIST": "n1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def trainer(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer.accelerator=cpu", "logger=none"])
    return training.build_trainer(cfg, tmp_path, callbacks=[], logger=False)


@pytest.fixture
def usr1_restored():
    before = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, before)


def test_under_slurm_the_trainer_does_not_requeue_by_itself(tmp_path, monkeypatch, usr1_restored):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(key)
    for key, value in SLURM_JOB.items():
        monkeypatch.setenv(key, value)
    t = trainer(tmp_path)
    environment = t._accelerator_connector.cluster_environment  # the object Lightning's signal connector reads
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False
    mine = signal.getsignal(signal.SIGUSR1)
    t._signal_connector.register_signal_handlers()  # what fit() does first: no SLURM requeue handler
    assert signal.getsignal(signal.SIGUSR1) is mine


def test_without_slurm_lightning_picks_its_own(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(key)
    assert cluster_plugins() == []
    assert type(trainer(tmp_path)._accelerator_connector.cluster_environment) is LightningEnvironment


def test_torchrun_inside_slurm_keeps_lightning_s_choice(monkeypatch):
    for key, value in SLURM_JOB.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1")  # torchrun's: Lightning checks it before SLURM
    assert cluster_plugins() == []
