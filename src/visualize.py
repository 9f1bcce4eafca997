"""Render what a trained network's units see: python src/visualize.py ckpt_path=... viz.layer=4 viz.top_k=9.

Writes two PNGs into a directory it prints: methods.png (image | backprop | deconvnet | guided for
a few test images) and top<k>_<layer>_<method>.png (the paper's per-layer figure). Every input is
checked, against the checkpoint's network and data, before anything is written.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from allconv import cli


def check_values(cfg: DictConfig) -> None:
    """Checks that need no checkpoint (also run by the pre-flight, before Hydra starts)."""
    from allconv.experiment import ConfigError
    from allconv.visualize import METHODS

    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ConfigError("ckpt_path is not set; give ckpt_path=<run dir>/checkpoints/last.ckpt")
    v = cfg.viz
    if v.method not in METHODS:
        raise ConfigError(f"unknown viz.method {v.method!r}; allowed: {', '.join(METHODS)}")
    for key in ("top_k", "num_channels", "num_images", "batch_size"):
        if not (isinstance(v[key], int) and not isinstance(v[key], bool) and v[key] >= 1):
            raise ConfigError(f"viz.{key} must be an integer >= 1, got {v[key]!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {cfg.device!r}; allowed: auto, cpu, cuda")


def prepare(cfg: DictConfig):
    """Load and check everything; returns (net, datamodule, out_dir). Writes nothing but the ZCA cache."""
    import torch

    from allconv import experiment, visualize

    check_values(cfg)
    run_cfg, ckpt = experiment.load_checkpoint_config(cfg.ckpt_path)
    try:
        net = experiment.build_net(run_cfg)
        state = {k.removeprefix("net."): w for k, w in ckpt["state_dict"].items() if k.startswith("net.")}
        net.load_state_dict(state)
    except (RuntimeError, KeyError, AttributeError):
        raise experiment.ConfigError(f"checkpoint {cfg.ckpt_path!r} does not match its model "
                                     f"({cli.model_name(run_cfg)})") from None
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    net.to(device)
    v = cfg.viz
    v.layer = str(v.layer)  # Hydra reads layer=4 as an integer; module names are strings
    channels = list(v.channels) if v.channels is not None else None
    visualize.validate(net, v.layer, v.unit, v.method, channels=channels)
    run_cfg.data = OmegaConf.merge(run_cfg.data, {k: x for k, x in cfg.data.items() if x is not None})
    dm = experiment.build_datamodule(run_cfg)
    dm.validate()
    dm.setup("test")
    n_test = len(dm.tensors["x_test"])
    if v.top_k > n_test:
        raise experiment.ConfigError(f"viz.top_k={v.top_k} is more than the {n_test} test images")
    ckpt_path = Path(cfg.ckpt_path)
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    out = Path(cfg.out_dir) if cfg.out_dir else run_dir / "visualize" / f"{v.layer}_{v.method}"
    if out.exists() and not out.is_dir():
        raise experiment.ConfigError(f"out_dir {str(out)!r} exists and is not a directory")
    return net, dm, out


def render(cfg: DictConfig, net, dm, out: Path) -> list[Path]:
    import torch

    from allconv import visualize

    v = cfg.viz
    device = next(net.parameters()).device
    x, raw = dm.tensors["x_test"], dm.raw_test
    idx = torch.linspace(0, len(x) - 1, min(v.num_images, len(x))).long()
    grid = visualize.method_grid(net, x[idx].to(device), raw[idx], v.layer, v.unit)
    channels = list(v.channels) if v.channels is not None else None
    figure, _ = visualize.topk_figure(net, x, raw, v.layer, channels, k=v.top_k, method=v.method,
                                      num_channels=v.num_channels, batch_size=v.batch_size)
    return [visualize.save_png(grid, out / "methods.png"),
            visualize.save_png(figure, out / f"top{v.top_k}_{v.layer}_{v.method}.png")]


@hydra.main(version_base="1.3", config_path="../conf", config_name="visualize")
def main(cfg: DictConfig) -> None:
    from allconv.data import DataError
    from allconv.experiment import ConfigError
    from allconv.visualize import VisualizeError

    try:
        net, dm, out = prepare(cfg)
    except (ConfigError, DataError, VisualizeError) as e:
        cli.fail(str(e))
    paths = render(cfg, net, dm, out)
    for p in paths:
        print(p)
    print(out)


if __name__ == "__main__":
    cli.preflight("visualize", sys.argv, check=check_values)
    main()
