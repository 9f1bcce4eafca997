"""What a unit sees: backprop, deconvnet and guided backprop reconstructions (paper, section 3).

reconstruct() propagates one unit's signal back to the input with the ReLU rule of a method; the
rules come from captum (GuidedBackprop, Deconvolution, Saliency and their Neuron* variants), which
hook nn.ReLU modules, in-place or not. Max-pooling routes the signal to its argmax in all three,
as autograd does. Our own code covers only what captum lacks: restoring the model's mode (captum
runs the model as it finds it, dropout on in training mode), "a channel at its strongest position"
as a neuron selector, one-line input errors, the top-activation search over a dataset, receptive
field crops, and the figures.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from allconv.errors import VisualizeError

METHODS = ("guided", "deconvnet", "backprop")
LOGITS = "logits"


# -- checks --------------------------------------------------------------------------------------
def layer_names(model: nn.Module) -> list[str]:
    """Valid `layer` values: "logits" (the model's output) and every named submodule."""
    return [LOGITS] + [name for name, _ in model.named_modules() if name]


def _module(model: nn.Module, layer: str) -> nn.Module | None:
    if layer == LOGITS:
        return None
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules or layer == "":
        raise VisualizeError(f"unknown layer {layer!r}; allowed: {', '.join(layer_names(model))}")
    return modules[layer]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise VisualizeError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


def _check_images(model: nn.Module, images) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise VisualizeError(f"images must be a non-empty float tensor (N, C, H, W), got {shape}")
    if not images.is_floating_point():
        raise VisualizeError(f"images must be a float tensor (whitened as in training), got {images.dtype}")
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and images.shape[1] != first_conv.in_channels:
        raise VisualizeError(f"images have {images.shape[1]} channels, the model takes {first_conv.in_channels}: "
                             f"got shape {tuple(images.shape)}")


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def inspecting(model: nn.Module):
    """Eval mode (dropout off, batch-norm statistics frozen) with gradients on; every module's mode restored after.

    Gradients are switched on even inside Lightning's inference_mode (validation/test hooks).
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _probe(model: nn.Module, images: torch.Tensor, module: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass (no grad): the model's output and the layer's output."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone())) if module else None
    try:
        with torch.no_grad():
            out = model(images)
    except RuntimeError as e:
        raise VisualizeError(f"images of shape {tuple(images.shape)} do not fit the model: "
                             f"{str(e).strip().splitlines()[0]}") from None
    finally:
        if handle is not None:
            handle.remove()
    if module is not None and not seen:
        raise VisualizeError("the layer was not called in the model's forward pass")
    return out, (seen[0] if module is not None else out)


def _units(unit, n_images: int, n_units: int, layer: str) -> torch.Tensor | None:
    if unit is None:
        return None
    units = torch.as_tensor(unit).reshape(-1)
    if units.is_floating_point() or units.dtype == torch.bool:
        raise VisualizeError(f"unit must be an integer (or one per image), got {unit!r}")
    if len(units) not in (1, n_images):
        raise VisualizeError(f"unit must be one integer or {n_images} (one per image), got {len(units)}")
    bad = units[(units < 0) | (units >= n_units)]
    if len(bad):
        raise VisualizeError(f"unit {int(bad[0])} is out of range for layer {layer!r}: allowed 0..{n_units - 1}")
    return units.expand(n_images).clone()


def _strongest(units: torch.Tensor | None):
    """captum neuron_selector: each image's unit (channel) at its strongest position, or the layer's strongest unit.

    captum's own selectors name one fixed position for all images; the paper takes each image's maximum.
    """
    def select(out: torch.Tensor) -> torch.Tensor:
        flat = out.reshape(out.shape[0], out.shape[1], -1)
        if units is None:
            return flat.reshape(out.shape[0], -1).max(1).values
        return flat[torch.arange(out.shape[0], device=out.device), units.to(out.device)].max(1).values

    return select


def validate(model: nn.Module, layer: str = LOGITS, unit=None, method: str = "guided",
             image_shape: tuple[int, ...] = (1, 3, 32, 32), channels=None) -> int:
    """Check layer, unit(s), channels and method against the model with one forward pass of zeros.

    Returns the layer's number of units (channels). Raises VisualizeError with one line.
    """
    _check_method(method)
    module = _module(model, layer)
    images = torch.zeros(image_shape, device=_device(model))
    _check_images(model, images)
    with inspecting(model):
        _, out = _probe(model, images, module)
    if out.ndim < 2:
        raise VisualizeError(f"layer {layer!r} has output shape {tuple(out.shape)}; need (N, C, ...)")
    for c in ([] if unit is None else [unit]) + list(channels or []):
        _units(c, 1, out.shape[1], layer)
    return out.shape[1]


# -- reconstructions -----------------------------------------------------------------------------
def reconstruct(model: nn.Module, images: torch.Tensor, layer: str = LOGITS, unit=None,
                method: str = "guided") -> torch.Tensor:
    """The signal of one unit per image propagated back to the input, shaped like `images`.

    layer: "logits" (the model's output; unit=None is each image's predicted class) or a name from
    model.named_modules() (unit is a channel, taken at its strongest position in each image;
    unit=None is the layer's strongest unit). unit may also hold one integer per image.
    method: "guided" (R*(f>0)*(R>0) at each ReLU), "deconvnet" (R*(R>0)) or "backprop" (R*(f>0)).
    The model's parameters, mode and hooks are as before; dropout is off during the pass.
    """
    from captum.attr import (
        Deconvolution,
        GuidedBackprop,
        NeuronDeconvolution,
        NeuronGradient,
        NeuronGuidedBackprop,
        Saliency,
    )

    _check_method(method)
    module = _module(model, layer)
    _check_images(model, images)
    device = _device(model)
    with inspecting(model):
        x = images.detach().to(device).clone()  # a normal tensor even if images came from inference mode
        out, layer_out = _probe(model, x, module)
        if layer_out.ndim < 2:
            raise VisualizeError(f"layer {layer!r} has output shape {tuple(layer_out.shape)}; need (N, C, ...)")
        units = _units(unit, len(x), layer_out.shape[1], layer)
        x.requires_grad_(True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
            if module is None:
                target = out.argmax(1) if units is None else units.to(device)
                if out.ndim != 2:
                    raise VisualizeError(f"the model's output has shape {tuple(out.shape)}; logits need (N, classes)")
                if method == "backprop":
                    grad = Saliency(model).attribute(x, target=target, abs=False)
                else:
                    cls = GuidedBackprop if method == "guided" else Deconvolution
                    grad = cls(model).attribute(x, target=target)
            else:
                cls = {"guided": NeuronGuidedBackprop, "deconvnet": NeuronDeconvolution,
                       "backprop": NeuronGradient}[method]
                grad = cls(model, module).attribute(x, neuron_selector=_strongest(units))
    return grad.detach().to(images.device, images.dtype)


# -- top activations and receptive fields --------------------------------------------------------
@dataclass
class TopActivations:
    """For each of `channels`: its k strongest images, their activations and the (row, col) of the maximum."""

    channels: list[int]
    values: torch.Tensor  # (C, k)
    indices: torch.Tensor  # (C, k) into the searched images
    positions: torch.Tensor  # (C, k, 2) in the layer's output grid


def top_activations(model: nn.Module, images: torch.Tensor, layer: str, channels=None, k: int = 9,
                    batch_size: int = 500) -> TopActivations:
    """Stream `images` through the model in batches on its device; keep each channel's k strongest images.

    channels=None searches every channel of the layer. Memory stays O(batch + channels * k).
    """
    module = _module(model, layer)
    _check_images(model, images)
    if not (isinstance(k, int) and 1 <= k <= len(images)):
        raise VisualizeError(f"top_k must be an integer in 1..{len(images)} (the images searched), got {k!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise VisualizeError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = _device(model)
    with inspecting(model), torch.no_grad():
        _, probe = _probe(model, images[:1].to(device), module)
        n_channels = probe.shape[1] if probe.ndim >= 2 else 0
        chans = list(range(n_channels)) if channels is None else [int(c) for c in channels]
        for c in chans:
            if not 0 <= c < n_channels:
                raise VisualizeError(f"unit {c} is out of range for layer {layer!r}: allowed 0..{n_channels - 1}")
        width = probe.shape[-1] if probe.ndim == 4 else 1
        chan_idx = torch.tensor(chans, device=device)
        best_v = torch.full((len(chans), 0), -math.inf, device=device)
        best_i = torch.zeros((len(chans), 0), dtype=torch.long, device=device)
        best_p = torch.zeros((len(chans), 0), dtype=torch.long, device=device)
        for start in range(0, len(images), batch_size):
            xb = images[start:start + batch_size].to(device)
            _, act = _probe(model, xb, module)
            flat = act.reshape(act.shape[0], act.shape[1], -1)[:, chan_idx]  # (B, C, positions)
            v, pos = flat.max(-1)  # each image's strongest position per channel
            idx = torch.arange(start, start + len(xb), device=device).expand(len(chans), -1)
            cand_v, cand_i = torch.cat([best_v, v.T], 1), torch.cat([best_i, idx], 1)
            cand_p = torch.cat([best_p, pos.T], 1)
            top = cand_v.topk(min(k, cand_v.shape[1]), dim=1)
            best_v, best_i, best_p = top.values, cand_i.gather(1, top.indices), cand_p.gather(1, top.indices)
    positions = torch.stack([best_p // width, best_p % width], -1)
    return TopActivations(chans, best_v.cpu(), best_i.cpu(), positions.cpu())


@dataclass
class ReceptiveField:
    """Unit (r, c) of a layer sees input rows top + r*jump ... + size - 1 (columns alike)."""

    size: int
    jump: int
    top: int
    whole_image: bool = False


def receptive_field(model: nn.Module, layer: str) -> ReceptiveField:
    """Receptive field of a layer's units, walking the leaf modules in registration order up to the layer.

    Exact for chains of convolutions and pools such as the 12 nets (square kernels assumed); global
    pooling, flattening and linear layers see the whole image.
    """
    _module(model, layer)
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    if layer != LOGITS:
        inside = [i for i, (n, _) in enumerate(leaves) if n == layer or n.startswith(layer + ".")]
        leaves = leaves[: inside[-1] + 1]
    size, jump, top = 1, 1, 0
    for _, m in leaves:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s, p = (_first(m.kernel_size), _first(m.stride), _first(m.padding))
            d = _first(getattr(m, "dilation", 1))
            top -= p * jump
            size += (k - 1) * d * jump
            jump *= s
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear)):
            return ReceptiveField(size, jump, top, whole_image=True)
    return ReceptiveField(size, jump, top)


def _first(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def crop(images: torch.Tensor, positions: torch.Tensor, rf: ReceptiveField) -> torch.Tensor:
    """Each image's receptive-field patch at positions[i] = (row, col); outside the image is zero."""
    h, w = images.shape[-2:]
    if rf.whole_image or rf.size >= max(h, w):
        return images
    s = rf.size
    padded = torch.nn.functional.pad(images, (s, s, s, s))
    rows = (rf.top + positions[:, 0] * rf.jump + s).tolist()
    cols = (rf.top + positions[:, 1] * rf.jump + s).tolist()
    return torch.stack([padded[i, :, r:r + s, c:c + s] for i, (r, c) in enumerate(zip(rows, cols, strict=True))])


# -- pictures ------------------------------------------------------------------------------------
def for_display(x: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] with zero at mid-grey (robust maximum: the 99.5th percentile of |x|)."""
    flat = x.detach().float().reshape(len(x), -1).abs()
    scale = flat.quantile(0.995, dim=1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
    return (0.5 + 0.5 * x.float() / scale).clamp(0, 1)


def raw_to_float(raw: torch.Tensor) -> torch.Tensor:
    """Un-whitened images (uint8 0..255, or float already in [0, 1]) as float [0, 1]."""
    return raw.float() / 255.0 if not raw.is_floating_point() else raw.float().clamp(0, 1)


def method_grid(model: nn.Module, images: torch.Tensor, raw: torch.Tensor, layer: str = LOGITS,
                unit=None, upscale: int = 2) -> torch.Tensor:
    """Rows of image | backprop | deconvnet | guided, one per image, as one (3, H, W) picture in [0, 1].

    upscale enlarges each 32-pixel tile (nearest neighbour) so the pictures can be read in a logger.
    """
    from torchvision.utils import make_grid

    columns = [raw_to_float(raw).cpu()]
    for method in ("backprop", "deconvnet", "guided"):
        columns.append(for_display(reconstruct(model, images, layer, unit, method)).cpu())
    tiles = torch.stack(columns, 1).flatten(0, 1)  # image-major: each image's row of four
    if upscale > 1:
        tiles = torch.nn.functional.interpolate(tiles, scale_factor=upscale, mode="nearest")
    return make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0)


def topk_figure(model: nn.Module, images: torch.Tensor, raw: torch.Tensor, layer: str, channels=None,
                k: int = 9, method: str = "guided", num_channels: int = 8, batch_size: int = 500,
                min_size: int = 32) -> tuple[torch.Tensor, TopActivations]:
    """The paper's per-layer figure: per channel, its top-k patches beside their reconstructions.

    channels=None shows the num_channels channels with the strongest top-k activations (dead units
    would give blank tiles). Each tile is a sqrt(k)-wide grid of patches | a grid of reconstructions.
    """
    from torchvision.utils import make_grid

    _check_method(method)
    if raw.shape[0] != images.shape[0] or raw.shape[-2:] != images.shape[-2:]:
        raise VisualizeError(f"raw images {tuple(raw.shape)} do not match the whitened ones {tuple(images.shape)}")
    top = top_activations(model, images, layer, channels, k, batch_size)
    if channels is None:
        order = top.values.mean(1).argsort(descending=True)[:num_channels]
        top = TopActivations([top.channels[i] for i in order], top.values[order], top.indices[order],
                             top.positions[order])
    rf = receptive_field(model, layer)
    nrow = max(1, round(math.sqrt(k)))
    tiles = []
    for c, idx, pos in zip(top.channels, top.indices, top.positions, strict=True):
        rec = reconstruct(model, images[idx], layer, unit=c, method=method).cpu()
        patches = crop(raw_to_float(raw[idx]).cpu(), pos, rf)
        recs = for_display(crop(rec, pos, rf))
        if patches.shape[-1] < min_size:  # tiny early-layer patches: enlarge, keep the pixels sharp
            scale = math.ceil(min_size / patches.shape[-1])
            patches = torch.nn.functional.interpolate(patches, scale_factor=scale, mode="nearest")
            recs = torch.nn.functional.interpolate(recs, scale_factor=scale, mode="nearest")
        left = make_grid(patches, nrow=nrow, padding=1, pad_value=1.0)
        right = make_grid(recs, nrow=nrow, padding=1, pad_value=1.0)
        gap = torch.ones(3, left.shape[1], 4)
        tiles.append(torch.cat([left, gap, right], 2))
    return make_grid(torch.stack(tiles), nrow=min(4, len(tiles)), padding=6, pad_value=1.0), top


def save_png(picture: torch.Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) picture in [0, 1] as PNG, creating the folder; whole or not at all (WriteError)."""
    import io

    from torchvision.utils import save_image

    from allconv.files import write_atomic

    buf = io.BytesIO()
    save_image(picture, buf, format="png")
    return write_atomic(path, buf.getvalue())
