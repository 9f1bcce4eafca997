"""TensorBoard for a run: Lightning's TensorBoardLogger, in <run dir>/tensorboard, one TensorBoard run per run.

build_tensorboard_logger(cfg, run_dir) is called by training.build_logger for logger=tensorboard and
logger=many. The folder has no version_N below it, so `tensorboard --logdir outputs` shows each run
folder as one run and a resumed run writes into the same one: its event file is added beside the
earlier ones and starts with TensorBoard's purge marker at the step where the resume takes over,
so the steps the killed launch logged after its last checkpoint are hidden, as csv/metrics.csv drops
those rows (csv_logger). No placeholder hp_metric is logged: the scalars are those of the CSV log.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from allconv.run_folder import RunFolder


def resume_step(ckpt_path: str | Path) -> int | None:
    """The logging step at which a run resumed from ckpt_path takes over (lightning_private.logging_step)."""
    from allconv import checkpoint
    from allconv.lightning_private import logging_step

    return logging_step(checkpoint.read(ckpt_path))


def build_tensorboard_logger(cfg: DictConfig, run_dir: Path) -> TensorBoardLogger:
    step = resume_step(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    extra = {"purge_step": step} if step is not None else {}  # SummaryWriter's marker for a restarted run
    name = RunFolder(run_dir).tensorboard.name
    return TensorBoardLogger(str(run_dir), name=name, version="", default_hp_metric=False, **extra)
