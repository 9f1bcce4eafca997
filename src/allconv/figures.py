"""The figures of a trained run, from its checkpoint: what `python src/visualize.py` draws (viz.figure).

reconstructions (default): methods.png (image | backprop | deconvnet | guided for a few test
    images) and top<k>_<layer>_<method>.png, the paper's per-layer figure (allconv.visualize).
filters: filters.png, the first convolution's filters as RGB tiles (left) and the second's as
    each filter's strongest input channel (grey tiles, right).
whitening: test images before and after GCN + ZCA, and the ZCA filters of a few pixels (rows of
    the run's own ZCA matrix, from its DataModule, as 32x32x3 images).

check(cfg) needs no checkpoint (cli.Preflight runs it before Hydra starts). render(cfg) loads the
checkpoint through allconv.checkpoint, checks every input against the network and the data, and
only then writes; a bad input writes nothing (the ZCA cache aside).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from allconv.errors import ConfigError, VisualizeError
from allconv.visualize import METHODS, for_display, raw_to_float, save_png

FIGURES = ("reconstructions", "filters", "whitening")
FILTER_TILE = 24  # pixels: a 3x3 filter drawn 8x, a 5x5 one 5x


# -- the pictures ----------------------------------------------------------------------------------
def first_convs(net: nn.Module, n: int = 2) -> list[tuple[str, nn.Conv2d]]:
    """The network's first n convolutions with their module names, in forward order."""
    convs = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if len(convs) < n:
        raise VisualizeError(f"the network has {len(convs)} convolution(s); the filters figure needs {n}")
    return convs[:n]


def signed_to_display(x: torch.Tensor) -> torch.Tensor:
    """Each item scaled on its own so that zero is mid-grey and its largest |value| is black or white."""
    scale = x.detach().float().flatten(1).abs().amax(1).clamp_min(1e-12)
    return (0.5 + 0.5 * x.float() / scale.reshape(-1, *[1] * (x.ndim - 1))).clamp(0, 1)


def strongest_input(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, k, k) -> (out, k, k): each filter's input channel with the largest L2 norm."""
    w = weight.detach().float()
    idx = w.flatten(2).norm(dim=2).argmax(1)
    return w[torch.arange(len(w)), idx]


def filter_grid(weight: torch.Tensor, rgb: bool, tile: int = FILTER_TILE) -> torch.Tensor:
    """One tile per filter, ceil(sqrt(out)) tiles a row, 1-pixel white gaps: a (3, H, W) picture in [0, 1].

    rgb: the filter's three input channels as one colour tile (the first layer sees RGB), else its
    strongest input channel in grey. Each tile is scaled on its own, zero at mid-grey.
    """
    from torchvision.utils import make_grid

    w = weight.detach().float().cpu()
    if rgb:
        if w.shape[1] != 3:
            raise VisualizeError(f"RGB filter tiles need 3 input channels, the layer has {w.shape[1]}")
        tiles = signed_to_display(w)
    else:
        tiles = signed_to_display(strongest_input(w))[:, None].expand(-1, 3, -1, -1)
    scale = max(1, math.ceil(tile / w.shape[-1]))
    tiles = nn.functional.interpolate(tiles, scale_factor=scale, mode="nearest")
    return make_grid(tiles, nrow=math.ceil(math.sqrt(len(tiles))), padding=1, pad_value=1.0)


def filter_pictures(net: nn.Module) -> dict[str, torch.Tensor]:
    """{layer name: picture}: the first conv layer in colour, the second by strongest input channel."""
    (name1, conv1), (name2, conv2) = first_convs(net)
    return {name1: filter_grid(conv1.weight, rgb=conv1.in_channels == 3), name2: filter_grid(conv2.weight, rgb=False)}


FILTERS_GAP = 8  # white pixels between the two layers' grids


def filters_figure(net: nn.Module) -> torch.Tensor:
    """The first conv layer's grid (left) beside the second's (right), top-aligned, FILTERS_GAP apart."""
    left, right = filter_pictures(net).values()
    height = max(left.shape[1], right.shape[1])

    def pad(p: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(p, (0, 0, 0, height - p.shape[1]), value=1.0)

    return torch.cat([pad(left), torch.ones(3, height, FILTERS_GAP), pad(right)], 2)


def pixel_positions(n: int, size: int = 32, margin: int = 2) -> list[tuple[int, int]]:
    """n pixels evenly spaced along the image's diagonal, corner to corner."""
    steps = torch.linspace(margin, size - 1 - margin, n).round().long().tolist()
    return [(r, r) for r in steps]


def zca_filters(P: torch.Tensor, positions: list[tuple[int, int]], size: int = 32) -> torch.Tensor:
    """(3 * len(positions), 3, size, size): for channel R, then G, then B, the ZCA row of each pixel.

    Images are flattened channel-major (C, H, W), as the DataModule does; P is symmetric, so row i
    is also the weights that make whitened value i from the centred input.
    """
    rows = [c * size * size + r * size + col for c in range(3) for r, col in positions]
    return P[rows].float().reshape(len(rows), 3, size, size)


def surround_to_display(filters: torch.Tensor, positions: list[tuple[int, int]]) -> torch.Tensor:
    """ZCA filters scaled by their largest |weight| away from their own pixel, zero at mid-grey.

    A ZCA row is a sharp peak at its pixel (on CIFAR-10 about 13x its strongest neighbour) in a weak
    negative surround; scaled by the peak, the surround would be invisible. The peak saturates.
    """
    x = filters.detach().float()
    away = x.clone()
    for i, (r, c) in enumerate(positions):
        away[i, :, r, c] = 0
    scale = away.flatten(1).abs().amax(1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
    return (0.5 + 0.5 * x / scale).clamp(0, 1)


def whitening_picture(raw: torch.Tensor, whitened: torch.Tensor, P: torch.Tensor, upscale: int = 2) -> torch.Tensor:
    """n columns; rows: the raw images, the same after GCN + ZCA, then the R, G and B ZCA rows of n pixels.

    Whitened images are scaled as the reconstructions are (visualize.for_display); ZCA rows as
    surround_to_display does.
    """
    from torchvision.utils import make_grid

    n = len(raw)
    if len(whitened) != n or whitened.shape[1:] != (3, 32, 32) or P.shape != (3072, 3072):
        raise VisualizeError(f"whitening figure needs (N, 3, 32, 32) images and a 3072x3072 ZCA matrix, got "
                             f"{tuple(raw.shape)}, {tuple(whitened.shape)} and {tuple(P.shape)}")
    positions = pixel_positions(n)
    filters = zca_filters(P, positions)
    tiles = torch.cat([raw_to_float(raw).cpu(), for_display(whitened).cpu(),
                       surround_to_display(filters, positions * 3)])  # R, G, B rows: the positions thrice
    if upscale > 1:
        tiles = nn.functional.interpolate(tiles, scale_factor=upscale, mode="nearest")
    return make_grid(tiles, nrow=n, padding=2, pad_value=1.0)


# -- the command -----------------------------------------------------------------------------------
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


def _out_dir(cfg: DictConfig) -> Path:
    from allconv.cli import check_output_dir

    v = cfg.viz
    ckpt_path = Path(cfg.ckpt_path)
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    name = f"{v.layer}_{v.method}" if v.figure == "reconstructions" else v.figure
    out = Path(cfg.out_dir) if cfg.out_dir else run_dir / "visualize" / name
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {str(out)!r} exists and is not a directory")
    check_output_dir(out, "out_dir")
    return out


def _datamodule(cfg: DictConfig, run_cfg: DictConfig):
    from allconv import experiment

    run_cfg.data = OmegaConf.merge(run_cfg.data, {k: x for k, x in cfg.data.items() if x is not None})
    dm = experiment.build_datamodule(run_cfg)
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
    run_cfg, module = checkpoint.load(cfg.ckpt_path, map_location="cpu")
    net = module.net
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    net.to("cuda" if use_cuda else "cpu")
    if v.figure == "filters":
        picture = filters_figure(net)
        out = _out_dir(cfg)
        return out, [save_png(picture, out / "filters.png")]

    if v.figure == "whitening":
        if run_cfg.data.preprocess != "gcn_zca":
            raise VisualizeError(f"viz.figure=whitening needs a run trained on GCN + ZCA whitened data; "
                                 f"this one used data.preprocess={run_cfg.data.preprocess!r}")
        dm = _datamodule(cfg, run_cfg)
        out = _out_dir(cfg)
        dm.setup("test")
        idx = _evenly_spaced(len(dm.tensors["x_test"]), v.num_images)
        picture = whitening_picture(dm.raw_test[idx], dm.tensors["x_test"][idx], dm.zca.P)
        return out, [save_png(picture, out / "whitening.png")]

    channels = list(v.channels) if v.channels is not None else None
    visualize.validate(net, v.layer, v.unit, v.method, channels=channels)
    dm = _datamodule(cfg, run_cfg)
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
