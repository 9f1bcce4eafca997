"""From a composed config to a trained, tested model: the objects a run is made of.

The pre-flight has checked the config (allconv.checks). train(cfg, run_dir) builds each object once (network,
DataModule, LightningModule, Trainer), records the run's identity, fits, tests and records the outcome in the run
folder (allconv.run_folder); evaluate(cfg) re-tests a checkpoint.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from allconv import models, run_folder, run_record, schema
from allconv.csv_logger import CSVLogger
from allconv.data import CIFARDataModule
from allconv.errors import ConfigError, WriteError
from allconv.learning_curve import plot_run
from allconv.module import AllConvModule
from allconv.precision import resolve as resolve_precision
from allconv.run_folder import RunFolder


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def net_kwargs(cfg: DictConfig) -> dict:
    """The keyword arguments of models.build for this run (num_classes comes from the data)."""
    m = cfg.model
    return dict(family=m.family, variant=m.variant, width=m.width, dropout_input=m.dropout_input,
                dropout_pool=m.dropout_pool, final_relu=m.final_relu, init=m.init, final_bias=m.final_bias,
                final_weights=m.final_weights, pool_gain=m.pool_gain)


def build_datamodule(cfg: DictConfig) -> CIFARDataModule:
    return CIFARDataModule(**OmegaConf.to_container(cfg.data, resolve=True), seed=cfg.seed)


def build_module(cfg: DictConfig) -> AllConvModule:
    """The LightningModule, which builds the network: every argument a plain value (its hyperparameters)."""
    o = cfg.optim
    return AllConvModule(net_kwargs(cfg), num_classes=cfg.data.num_classes, lr=o.lr, momentum=o.momentum,
                         weight_decay=o.weight_decay, milestones=list(o.milestones), gamma=o.gamma,
                         nesterov=o.nesterov, max_update_norm=o.get("max_update_norm"), compile=cfg.model.compile,
                         channels_last=cfg.model.channels_last, config=OmegaConf.to_container(cfg, resolve=True))


def trainer_kwargs(cfg: DictConfig) -> dict:
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    cuda = torch.cuda.is_available() and t.get("accelerator") in ("auto", "gpu", "cuda")
    t["precision"] = resolve_precision(t.get("precision", "auto"), t.get("accelerator", "auto"))[0]
    if t.get("benchmark") == "auto":
        t["benchmark"] = cuda
    if t.get("strategy") == "ddp":  # relaunch this Hydra job, not the whole sweep, on ranks 1..N-1
        from allconv.lightning_private import HydraJobDDPStrategy

        t["strategy"] = HydraJobDDPStrategy()
    if not cfg.data.get("val_size") and t.get("limit_val_batches") is None:
        t["limit_val_batches"] = 0  # the paper's protocol: no validation split, no validation loop
    return {k: v for k, v in t.items() if v is not None}


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, logger, precision: str | None = None) -> L.Trainer:
    """The Trainer of a run in run_dir; precision: the run's own (run_precision), else trainer.precision resolved."""
    from allconv.callbacks import AtomicCheckpointIO, cluster_plugins

    folder = RunFolder(run_dir)
    kwargs = {**trainer_kwargs(cfg), **({"precision": precision} if precision else {})}
    if cfg.callbacks.get("progress_bar") == "none":
        kwargs["enable_progress_bar"] = False  # else Lightning adds its own bar
    if kwargs.get("profiler") in schema.PROFILERS:  # Lightning's own, from the name, writes its table nowhere
        from lightning.pytorch.profilers import AdvancedProfiler, SimpleProfiler

        profiler = SimpleProfiler if kwargs["profiler"] == "simple" else AdvancedProfiler
        kwargs["profiler"] = profiler(dirpath=str(folder.path), filename=folder.profiler_name)
    return L.Trainer(default_root_dir=str(folder.path), callbacks=callbacks, logger=logger,
                     plugins=[AtomicCheckpointIO(), *cluster_plugins()], **kwargs)


def build_logger(cfg: DictConfig, run_dir: Path):
    """The run's logger, or a list of them (logger=many): each gets the same metrics from Lightning.

    csv/metrics.csv is written whichever are picked (W&B's logger holds a CSVLogger of its own): the learning curve
    is drawn from it. The first is trainer.logger, which train() saves and, for W&B, closes with the final metrics.
    """
    kind = cfg.logger.kind
    if kind == "none":
        return False
    kinds = list(cfg.logger.loggers) if kind == "many" else [kind]
    unknown = [k for k in kinds if k not in schema.LOGGERS]
    if unknown:
        raise ConfigError(f"unknown logger {unknown[0]!r}; allowed: {', '.join(schema.LOGGERS)}, many, none")
    if "wandb" in kinds:
        from allconv.wandb_logger import build_wandb_logger  # imported only here: wandb is heavy

        loggers = [build_wandb_logger(cfg, run_dir)]
    else:
        # Lightning's, its files written whole
        loggers = [CSVLogger(str(run_dir), name=RunFolder(run_dir).csv.name, version="")]
    if "tensorboard" in kinds:
        from allconv.tensorboard_logger import build_tensorboard_logger

        loggers.append(build_tensorboard_logger(cfg, run_dir))
    return loggers if len(loggers) > 1 else loggers[0]


def identity(cfg: DictConfig, dm: CIFARDataModule, precision: str) -> dict:
    """What the run is (allconv.run_record): its resolved settings, the overrides resume replays, the fingerprints
    of its arrays and of its whitened inputs (dm set up: the fit actually used), the precision it trains in."""
    import os

    from hydra.core.hydra_config import HydraConfig

    from allconv import run_record
    from allconv.resume import replayable

    task = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return {"format": run_record.IDENTITY_FORMAT, "settings": run_folder.settings(cfg),
            "overrides": replayable(task, cfg), "data": dm.fingerprint(), "inputs": dm.inputs_fingerprint(),
            "fit": dm.fit_summary(), "precision": precision, "cwd": os.getcwd()}


def run_precision(cfg: DictConfig, folder: RunFolder) -> tuple[str, str]:
    """(the precision the run trains in, why): a continuation keeps the one it was started in (trainer.precision=auto
    may mean another on this machine), a new run resolves auto on this machine (allconv.precision)."""
    resolved, reason = resolve_precision(cfg.trainer.get("precision", "auto"), cfg.trainer.get("accelerator", "auto"))
    cuda = torch.cuda.is_available() and cfg.trainer.get("accelerator") in ("auto", "gpu", "cuda")
    kept = run_folder.recorded_precision(folder, cuda) if cfg.trainer.get("precision") == "auto" else None
    if kept is None or kept == resolved:
        return str(resolved), reason
    return kept, f"kept from the run's record; trainer.precision=auto would be {resolved} here"


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Fit and test one network; returns the metrics also written to the run folder's metrics.json."""
    from allconv.callbacks import EpochSeed, FitClock, RunIdentity, build_callbacks

    folder = RunFolder(run_dir)
    dm = build_datamodule(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg)
    net = module.net
    run_dir.mkdir(parents=True, exist_ok=True)
    precision, reason = run_precision(cfg, folder)
    record = None
    check_only = bool(cfg.trainer.get("fast_dev_run"))  # a check of the code, not a run: it leaves no record
    if not run_folder.is_secondary_rank() and not check_only:  # the run's identity, once; a continuation matches it
        dm.prepare_data()
        dm.setup("fit")  # the whitening fit is part of the identity (Lightning's own setup() then finds it done)
        record = run_folder.record(folder, identity(cfg, dm, precision))
    clock = FitClock()
    callbacks = build_callbacks(cfg, run_dir) + [EpochSeed(cfg.seed), clock, RunIdentity(record)]
    if check_only:  # Lightning 2.6's ModelCheckpoint.on_train_end saves last.ckpt even under fast_dev_run
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
    trainer = build_trainer(cfg, run_dir, callbacks, False if check_only else build_logger(cfg, run_dir), precision)
    if trainer.is_global_zero:
        print(f"precision: {precision} ({reason})", flush=True)
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
    wall = clock.elapsed()  # over all launches of a resumed run
    ranks = None
    if trainer.world_size > 1:  # record that the ranks agree (weights, one ZCA fit)
        from allconv import ddp

        ranks = ddp.rank_summary(trainer, module, dm)
    val_error = trainer.callback_metrics.get("val/error")  # test() replaces callback_metrics
    trainer.test(module, datamodule=dm, verbose=False)
    metrics = {
        "status": run_record.FINISHED,
        "model": models.config_name(cfg.model.family, cfg.model.variant),
        "network": models.paper_name(cfg.model.family, cfg.model.variant),
        "family": cfg.model.family, "variant": cfg.model.variant, "width": cfg.model.width,
        "data": cfg.data.source, "preprocess": cfg.data.preprocess, "augment": cfg.data.augment,
        "lr": cfg.optim.lr, "max_update_norm": cfg.optim.get("max_update_norm"), "seed": cfg.seed,
        "epochs": trainer.current_epoch,
        "batch_size": cfg.data.batch_size,
        "params": models.count_params(net),
        "test_error": float(trainer.callback_metrics["test/error"]),
        "wall_time_s": wall,
        "device": str(trainer.strategy.root_device), "precision": str(trainer.precision), "precision_reason": reason,
        "tags": list(cfg.get("tags") or []),
    }
    stopped = stopped_by(cfg, trainer)
    if stopped:  # finished, by a limit of its own settings: fewer epochs than trainer.max_epochs
        # Lightning counts an epoch stopped part-way by max_steps as done (current_epoch, `epochs`), one stopped by
        # max_time not: here the whole ones, from the batches trained
        per_epoch = trainer.num_training_batches
        done = trainer.current_epoch if not 0 < per_epoch < math.inf else \
            min(trainer.current_epoch, trainer.global_step * trainer.accumulate_grad_batches // per_epoch)
        metrics.update(stopped_by=stopped, epochs_completed=done, max_epochs=trainer.max_epochs)
        print(f"stopped by {stopped} after {done} of {trainer.max_epochs} epochs (global step {trainer.global_step})",
              file=sys.stderr, flush=True)
    if val_error is not None:
        metrics["val_error"] = float(val_error)
    spread = float(trainer.callback_metrics["test/score_spread"])
    if math.isfinite(spread):  # not when no test batch ran (trainer.limit_test_batches=0)
        metrics["test_score_spread"] = spread
    if ranks is not None:
        metrics["ddp"] = ranks
    if check_only and trainer.is_global_zero:
        metrics["status"] = "checked"
        print(f"fast_dev_run: {trainer.global_step} training step(s) and the test ran; test error "
              f"{metrics['test_error']:.4f}; a check, not a run: nothing is recorded in {run_dir}", file=sys.stderr,
              flush=True)
    elif trainer.is_global_zero:
        folder.write_outcome(metrics)
        if trainer.logger:
            trainer.logger.save()
        title = f"{metrics['network']}, lr {cfg.optim.lr}, seed {cfg.seed}, width {cfg.model.width}"
        try:
            plot_run(folder.metrics_csv, folder.learning_curve, title=title)
        except Exception as e:  # the result is metrics.json, written above: a figure never fails a finished run
            what = e if isinstance(e, WriteError) else \
                f"{folder.learning_curve} not drawn ({type(e).__name__}: {_first_line(e)[:160]})"
            print(f"warning: {what}; the run's result stands (python -m allconv.learning_curve {run_dir} redraws it)",
                  file=sys.stderr)
    if hasattr(trainer.logger, "finish_run"):  # W&B: each job its own run, closed with the final metrics
        trainer.logger.finish_run(metrics)
    if ranks is not None:
        ddp.end_job()
    return metrics


def stopped_by(cfg: DictConfig, trainer: L.Trainer) -> str | None:
    """The setting that ended a fit before trainer.max_epochs (max_steps, max_time, or a callback), None if it ran
    them all."""
    from lightning.pytorch.callbacks import Timer

    if trainer.fast_dev_run or trainer.max_epochs is None or trainer.current_epoch >= trainer.max_epochs > 0:
        return None
    if 0 <= trainer.max_steps <= trainer.global_step:
        return f"trainer.max_steps={trainer.max_steps}"
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is not None and (timer.time_remaining() or 0) <= 0:
        return f"trainer.max_time={schema.shown(cfg.trainer.get('max_time'))}"
    return "a callback (trainer.should_stop)" if trainer.max_epochs > 0 else None


def evaluate(cfg: DictConfig) -> dict:
    """Re-test a checkpoint (cfg.ckpt_path) on its own data, or on the data keys cfg.data sets.

    The checkpoint gives the network and which data it was tested on; how the test runs (the
    Trainer: devices, precision, progress bar) is eval.yaml's and the command line's only.
    """
    from allconv import checkpoint

    ckpt = checkpoint.read(cfg.ckpt_path)
    module = checkpoint.module_from(ckpt, cfg.ckpt_path)
    dm = checkpoint.datamodule(ckpt, cfg.ckpt_path, cfg.data)
    dm.validate()
    settings = {"accelerator": "auto", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "auto",
                "benchmark": "auto", **OmegaConf.to_container(cfg.trainer, resolve=True)}
    kwargs = trainer_kwargs(OmegaConf.create({"trainer": settings, "data": {}}))
    trainer = L.Trainer(logger=False, **{**kwargs, "max_epochs": 1})
    trainer.test(module, datamodule=dm, verbose=False)
    net = ckpt["hyper_parameters"]["net"]
    return {"model": models.config_name(net.get("family"), net.get("variant")),
            "ckpt_path": str(cfg.ckpt_path), "data": dm.source,
            "test_error": float(trainer.callback_metrics["test/error"])}
