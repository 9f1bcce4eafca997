"""The visualize command: from a checkpoint to the PNGs of viz.figure (python src/visualize.py).

check(cfg) needs no checkpoint (cli.Preflight runs it before Hydra starts). render(cfg) loads the
checkpoint through allconv.checkpoint, checks every input against the network and the data, and
only then writes; a bad input writes nothing (the ZCA cache aside). From the checkpoint it takes the
network and which data it was trained on (checkpoint.data_identity); folders, the ZCA cache and the
device are visualize.yaml's and the command line's. The drawing is allconv.figures.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from allconv.errors import ConfigError, VisualizeError
from allconv.figures import filters_figure, whitening_picture
from allconv.run_folder import RunFolder
from allconv.visualize import METHODS, save_png

FIGURES = ("reconstructions", "filters", "whitening")


def check(cfg: DictConfig) -> None:
    """The settings that need no checkpoint."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ConfigError("ckpt_path is not set; give ckpt_path=<run dir>/checkpoints/last.ckpt")
    v = cfg.viz
    if v.figure not in FIGURES:
        raise ConfigError(f"unknown viz.figure {v.figure!r}; allowed: {', '.join(FIGURES)}")
    if v.method not in METHODS:
        raise ConfigError(f"unknown viz.method {v.method!r}; allowed: {', '.join(METHODS)}")
    for key in ("top_k", "num_channels", "num_images", "batch_size"):
        if not (isinstance(v[key], int) and not isinstance(v[key], bool) and v[key] >= 1):
            raise ConfigError(f"viz.{key} must be an integer >= 1, got {v[key]!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {cfg.device!r}; allowed: auto, cpu, cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: this machine has no CUDA GPU; use device=auto or device=cpu")


def _out_dir(cfg: DictConfig) -> Path:
    from allconv.files import check_output_dir

    v = cfg.viz
    ckpt_path = Path(cfg.ckpt_path)
    run_dir = RunFolder.of_checkpoint(ckpt_path).path
    name = f"{v.layer}_{v.method}" if v.figure == "reconstructions" else v.figure
    out = Path(cfg.out_dir) if cfg.out_dir else RunFolder(run_dir).visualize / name
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {str(out)!r} exists and is not a directory")
    from allconv.run_folder import check_outside_record

    check_outside_record(out)  # a training run's record is never written by visualize
    check_output_dir(out, "out_dir")
    return out


def _datamodule(cfg: DictConfig, ckpt: dict):
    from allconv import checkpoint

    dm = checkpoint.datamodule(ckpt, cfg.ckpt_path, cfg.data)
    dm.validate()
    return dm


def _evenly_spaced(n_total: int, n: int) -> torch.Tensor:
    return torch.linspace(0, n_total - 1, min(n, n_total)).long()


def render(cfg: DictConfig) -> tuple[Path, list[Path]]:
    """Draw cfg.viz.figure from cfg.ckpt_path; returns (the folder, the PNGs written)."""
    from allconv import checkpoint, visualize

    check(cfg)
    v = cfg.viz
    v.layer = str(v.layer)  # Hydra reads layer=4 as an integer; module names are strings
    ckpt = checkpoint.read(cfg.ckpt_path, map_location="cpu")
    net = checkpoint.module_from(ckpt, cfg.ckpt_path).net
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    net.to("cuda" if use_cuda else "cpu")
    if v.figure == "filters":
        picture = filters_figure(net)
        out = _out_dir(cfg)
        return out, [save_png(picture, out / "filters.png")]

    if v.figure == "whitening":
        dm = _datamodule(cfg, ckpt)
        if dm.preprocess != "gcn_zca":
            raise VisualizeError(f"viz.figure=whitening needs a run trained on GCN + ZCA whitened data; "
                                 f"this one used data.preprocess={dm.preprocess!r}")
        out = _out_dir(cfg)
        dm.setup("test")
        idx = _evenly_spaced(len(dm.tensors["x_test"]), v.num_images)
        picture = whitening_picture(dm.raw_test[idx], dm.tensors["x_test"][idx], dm.zca.P)
        return out, [save_png(picture, out / "whitening.png")]

    channels = list(v.channels) if v.channels is not None else None
    visualize.validate(net, v.layer, v.unit, v.method, channels=channels)
    dm = _datamodule(cfg, ckpt)
    dm.setup("test")
    x, raw = dm.tensors["x_test"], dm.raw_test
    if v.top_k > len(x):
        raise ConfigError(f"viz.top_k={v.top_k} is more than the {len(x)} test images")
    out = _out_dir(cfg)
    device = next(net.parameters()).device
    idx = _evenly_spaced(len(x), v.num_images)
    grid = visualize.method_grid(net, x[idx].to(device), raw[idx], v.layer, v.unit)
    figure, _ = visualize.topk_figure(net, x, raw, v.layer, channels, k=v.top_k, method=v.method,
                                      num_channels=v.num_channels, batch_size=v.batch_size)
    return out, [save_png(grid, out / "methods.png"), save_png(figure, out / f"top{v.top_k}_{v.layer}_{v.method}.png")]
