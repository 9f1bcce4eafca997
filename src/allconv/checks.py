"""The pre-flight's checks of a training or eval job: everything that can be checked before a run folder exists.

cli.Preflight runs check() (conf/train.yaml) or check_eval() (conf/eval.yaml) inside Hydra on the composed config
of every job before the first one starts: the values against allconv.schema, the trainer settings on this machine,
the model's knobs and layer names (on the meta device: nothing is allocated or initialised), the data files'
headers, the batches a limit leaves, and a checkpoint to continue from.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from allconv import models, schema
from allconv.errors import ConfigError
from allconv.run_folder import RunFolder
from allconv.training import _first_line, build_datamodule, net_kwargs, trainer_kwargs


def check_config(cfg: DictConfig) -> None:
    """The values (allconv.schema), the trainer on this machine, the model's knobs and layer names."""
    schema.validate(cfg, schema.TrainConfig)
    check_trainer(cfg)
    if cfg.callbacks.get("early_stopping") and not cfg.data.get("val_size"):
        raise ConfigError("callbacks=early_stopping watches val/error: it needs a validation split, data.val_size > 0")
    with torch.device("meta"):  # the builder checks the model knobs; meta: no memory, no init compute
        net = models.build(**net_kwargs(cfg), num_classes=cfg.data.num_classes)
    gb = cfg.callbacks.get("guided_backprop")
    if gb and gb.get("every_n_epochs"):
        from allconv.visualize import validate

        try:
            validate(net, str(gb.layer), gb.unit)
        except ValueError as e:
            raise ConfigError(f"callbacks.guided_backprop: {e}") from None


def check_trainer(cfg: DictConfig) -> None:
    """The trainer settings against this machine's GPUs, then as Lightning's Trainer reads them.

    Skipped for a sweep whose jobs a scheduler runs on other machines (a SLURM launcher): the
    submitting machine's devices say nothing about theirs.
    """
    if _jobs_run_elsewhere(cfg):
        return
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    accelerator, devices = t.get("accelerator") or "auto", t.get("devices") or "auto"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator in ("gpu", "cuda") and not gpus:
        raise ConfigError(f"trainer.accelerator={accelerator}: this machine has no CUDA GPU; "
                          f"use trainer=cpu (or trainer.accelerator=auto)")
    if gpus and accelerator in ("auto", "gpu", "cuda"):
        asked = max(devices) + 1 if isinstance(devices, list) else devices
        if isinstance(asked, int) and asked > gpus:
            raise ConfigError(f"trainer.devices={schema.shown(devices)}: this machine has {gpus} CUDA GPU"
                              f"{'s' if gpus > 1 else ''}")
        if devices in ("auto", -1) and gpus > 1 and t.get("strategy") in (None, "auto"):
            raise ConfigError(f"trainer.devices={devices}: that is this machine's {gpus} GPUs, one process each: "
                              f"use trainer=ddp (or trainer.devices=1)")
    from allconv.lightning_private import check_trainer_settings

    kwargs = trainer_kwargs(cfg)
    picked = {k: kwargs[k] for k in ("accelerator", "devices", "num_nodes", "strategy", "precision") if k in kwargs}
    quiet = logging.root.manager.disable
    logging.disable(logging.INFO)  # its notes ("Using bfloat16 ..."): the Trainer gives them when it is built
    try:
        with warnings.catch_warnings():  # and its advice
            warnings.simplefilter("ignore")
            check_trainer_settings(**picked)  # the Trainer's own reading of these settings; nothing is launched
    except Exception as e:
        settings = ", ".join(f"trainer.{k}={schema.shown(t.get(k))}" for k in picked if t.get(k) is not None)
        raise ConfigError(f"{settings}: {_first_line(e)}") from None
    finally:
        logging.disable(quiet)


def _jobs_run_elsewhere(cfg: DictConfig) -> bool:
    target = OmegaConf.select(cfg, "hydra.launcher._target_")
    if not target:
        return False
    from hydra.utils import get_class

    # by name: Hydra's plugin scan executes the submitit plugin's module again, so its classes are new objects
    return any(f"{c.__module__}.{c.__qualname__}" == "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
               "BaseSubmititLauncher" for c in get_class(target).__mro__)


def check(cfg: DictConfig) -> None:
    """Everything that can be checked before Hydra creates a run directory: settings and data files."""
    try:
        check_config(cfg)
    except ValueError as e:  # the builder's own one-line errors
        raise e if isinstance(e, ConfigError) else ConfigError(str(e)) from None
    build_datamodule(cfg).validate()
    check_batch_limits(cfg)
    if cfg.logger.get("save_dir"):  # W&B's folder, when not the run's own: a read-only one is one line here
        from allconv.files import check_output_dir

        check_output_dir(cfg.logger.save_dir, "logger.save_dir")
    if cfg.get("ckpt_path"):  # resuming: the file must be a plain allconv checkpoint (nothing executed)
        from allconv import checkpoint

        ckpt = checkpoint.read(cfg.ckpt_path)
        checkpoint.module_from(ckpt, cfg.ckpt_path)  # its tensors fit its own network: dtypes too, never cast
        saved = ckpt["state_dict"]
        with torch.device("meta"):  # the network this command builds, without memory
            mine = models.build(**net_kwargs(cfg), num_classes=cfg.data.num_classes).state_dict()
        mine = {f"net.{k}": v for k, v in mine.items()}
        wrong = next((k for k in mine if k not in saved or tuple(saved[k].shape) != tuple(mine[k].shape)), None)
        if wrong is not None:
            held = tuple(saved[wrong].shape) if wrong in saved else "nothing"
            raise ConfigError(f"ckpt_path={str(cfg.ckpt_path)!r} holds another network than this command builds "
                              f"({wrong}: {held} vs {tuple(mine[wrong].shape)}); continue a run with its own settings")


def split_sizes(cfg: DictConfig) -> dict[str, int] | None:
    """The images of each split a run loads (train, val, test), from the arrays' headers; None if not known yet
    (the official files not downloaded)."""
    d = cfg.data
    if d.source == "npz":
        from allconv.cifar_files import _npz_headers

        shapes = _npz_headers(Path(d.path))
        n_train, n_test = shapes["x_train"][0][0], shapes["x_test"][0][0]
    elif d.source in ("cifar10", "cifar100"):
        n_train, n_test = 50_000, 10_000
    else:
        return None
    n_train, n_test = min(n_train, d.limit_train or n_train), min(n_test, d.limit_test or n_test)
    return {"train": n_train - (d.val_size or 0), "val": d.val_size or 0, "test": n_test}


def check_batch_limits(cfg: DictConfig) -> None:
    """A fraction trainer.limit_*_batches that leaves no batch of its split is refused here, naming the value and
    the split's batches, rather than by Lightning's Trainer with a traceback once that loop starts (the test's:
    after the whole training). A whole number of batches is never refused: Lightning takes at most as many as
    there are."""
    sizes = split_sizes(cfg)
    t = cfg.trainer
    devices = t.get("devices") if isinstance(t.get("devices"), int) and t.get("devices") > 0 else 1
    world = devices * (t.get("num_nodes") or 1)
    for split, size_key in (("train", "batch_size"), ("val", "eval_batch_size"), ("test", "eval_batch_size")):
        fraction = t.get(f"limit_{split}_batches")
        if sizes is None or not isinstance(fraction, float) or not 0 < fraction < 1 or not sizes[split]:
            continue
        per_rank, batch = -(-sizes[split] // world), cfg.data[size_key]
        batches = per_rank // batch if split == "train" and cfg.data.drop_last else -(-per_rank // batch)
        if batches and int(batches * fraction) == 0:
            least = 1 / batches
            raise ConfigError(
                f"trainer.limit_{split}_batches={fraction:g} is {batches * fraction:.2g} of the {batches} {split} "
                f"batch{'es' if batches > 1 else ''} ({sizes[split]:,} images at data.{size_key}={batch}"
                f"{f' on {world} devices' if world > 1 else ''}): no batch would run; give at least "
                f"{math.ceil(least * 1000) / 1000:g} or a whole number of batches (trainer.limit_{split}_batches=1)")


def check_eval(cfg: DictConfig) -> None:
    """src/eval.py's check: the checkpoint loads safely, its weights fit the network it names, its data is
    there, and the output folder (hydra.run.dir) is not a training run's: eval writes into a folder of its own."""
    from allconv import checkpoint

    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ConfigError("ckpt_path is not set; give ckpt_path=<run dir>/checkpoints/last.ckpt")
    out = OmegaConf.select(cfg, "hydra.run.dir", default=None)
    if out is not None and RunFolder(str(out)).is_run():  # finished, interrupted, failed: its record stays
        raise ConfigError(f"hydra.run.dir={str(out)!r} holds a training run; eval writes into a folder of its own: "
                          f"choose another hydra.run.dir (or leave it unset)")
    ckpt = checkpoint.read(cfg.ckpt_path)
    checkpoint.module_from(ckpt, cfg.ckpt_path)
    checkpoint.datamodule(ckpt, cfg.ckpt_path, cfg.data).validate()
