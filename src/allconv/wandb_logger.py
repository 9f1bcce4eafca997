"""Weights & Biases for a run: Lightning's WandbLogger, offline unless an API key is there.

build_wandb_logger(cfg, run_dir) is called by training.build_logger for logger=wandb. Each run,
and so each Hydra multirun job, is its own W&B run: a run left open in this process by an earlier
job (one that failed before it finished) is closed first, and training.train closes each run
with the final metrics as its summary and the learning curve as an image (the guided-backprop
grids and the filters come from visualize_callback.GuidedBackpropGrid). Name and group come from
model, lr and seed, so the W&B UI groups a (model, lr) cell's seeds. Under a `wandb agent` the
sweep's own run is picked up by wandb.init from the agent's environment.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from allconv import models
from allconv.csv_logger import CSVLogger  # written whole; a resumed run keeps its earlier rows
from allconv.errors import ConfigError
from allconv.lightning_private import QuietWandbLogger
from allconv.run_folder import RunFolder

MODES = ("auto", "online", "offline", "disabled")


def has_api_key() -> bool:
    """An API key in WANDB_API_KEY or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return bool(netrc.netrc().authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(requested: str) -> str:
    """auto -> online with a key, else offline (an explicit WANDB_MODE wins, as wandb users expect)."""
    if requested not in MODES:
        raise ConfigError(f"unknown logger.mode {requested!r}; allowed: {', '.join(MODES)}")
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE")
    if env:
        return "offline" if env == "dryrun" else env
    return "online" if has_api_key() else "offline"


class RunLogger(QuietWandbLogger):
    """WandbLogger that ends its W&B run once the run's metrics.json exists (see training.train).

    With run_dir it also writes <run_dir>/csv/metrics.csv, as logger=csv does: the learning curve
    (learning_curve.plot_run) is drawn from that file, for W&B runs too.
    """

    def __init__(self, run_dir: str | Path | None = None, **kwargs):
        super().__init__(**kwargs)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.folder = RunFolder(run_dir) if run_dir is not None else None
        self._csv = CSVLogger(str(run_dir), name=self.folder.csv.name, version="") if run_dir is not None else None

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(metrics, step)
        if self._csv is not None:
            self._csv.log_metrics(metrics, step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        super().log_hyperparams(params, *args, **kwargs)
        if self._csv is not None:
            self._csv.log_hyperparams(params)

    def save(self) -> None:
        super().save()
        if self._csv is not None:
            self._csv.save()

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._csv is not None:
            self._csv.finalize(status)

    def finish_run(self, metrics: dict) -> None:
        run = self.started_run
        if run is None:
            return
        curve = self.folder.learning_curve if self.folder else None
        if curve is not None and curve.is_file():  # drawn by training.train just before
            self.log_image(key="learning_curve", images=[str(curve)], caption=[str(metrics.get("model", ""))])
        run.summary.update({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})
        run.finish()
        self.forget_run()


def build_wandb_logger(cfg: DictConfig, run_dir: Path) -> RunLogger:
    import wandb

    lg = cfg.logger
    mode = resolve_mode(lg.get("mode", "auto"))
    if mode == "offline" and lg.get("mode", "auto") == "auto" and not os.environ.get("WANDB_MODE"):
        print(f"wandb: no API key (WANDB_API_KEY or `wandb login`): logging offline to {RunFolder(run_dir).wandb}; "
              f"upload later with `wandb sync {RunFolder(run_dir).wandb}/offline-run-*`", file=sys.stderr)
    if wandb.run is not None:  # left open by an earlier job of this process that failed
        wandb.finish(exit_code=1)
    model = models.config_name(cfg.model.family, cfg.model.variant)
    save_dir = Path(lg.save_dir) if lg.get("save_dir") else run_dir
    save_dir.mkdir(parents=True, exist_ok=True)
    return RunLogger(
        run_dir=run_dir,
        name=f"{model}_lr{cfg.optim.lr}_s{cfg.seed}",
        group=lg.get("group") or f"{model}_lr{cfg.optim.lr}",
        project=lg.project,
        entity=lg.get("entity"),
        save_dir=str(save_dir),
        mode=mode,
        tags=list(lg.get("tags") or []) + [model, f"lr{cfg.optim.lr}", cfg.data.source],
        job_type="train",
        log_model=bool(lg.get("log_model")) and mode == "online",
        config=OmegaConf.to_container(cfg, resolve=True),
        reinit="finish_previous",
    )
