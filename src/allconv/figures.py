"""The pictures of a trained network, drawn from tensors: what `python src/visualize.py` draws (viz.figure).

reconstructions (default): methods.png (image | backprop | deconvnet | guided for a few test
    images) and top<k>_<layer>_<method>.png, the paper's per-layer figure (allconv.visualize).
filters: filters.png, the first convolution's filters as RGB tiles (left) and the second's as
    each filter's strongest input channel (grey tiles, right).
whitening: test images before and after GCN + ZCA, and the ZCA filters of a few pixels (rows of
    the run's own ZCA matrix, from its DataModule, as 32x32x3 images).

Pure drawing: tensors and modules in, image tensors out. The command that loads a checkpoint and
writes the PNGs is allconv.visualize_run, which sits above this module (imports point one way).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from allconv.errors import VisualizeError
from allconv.visualize import for_display, raw_to_float

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
