"""The paper's 12 networks: one spec table, one builder.

Springenberg et al. (2014), Tables 1-2. A network is a family (the two feature blocks: A, B, C)
times a variant (how each block downsamples: base, strided, convpool, allcnn), followed by the
shared head 3x3 conv 192 (valid) -> 1x1 conv 192 -> 1x1 conv n_classes -> global average pool.
Every layer is a standard torch module (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Dropout), so hooks
and libraries such as captum see the whole network. This module imports nothing else of allconv.

    python -m allconv.models      # the 12, with parameters and multiply-adds per image
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import nn

# Kernel sizes of each feature block's convolutions, per family.
FAMILIES: dict[str, tuple[int, ...]] = {"a": (5,), "b": (5, 1), "c": (3, 3)}
VARIANTS = ("base", "strided", "convpool", "allcnn")
INITS = ("he", "xavier", "default")
FINAL_WEIGHTS = ("zero", "init")  # the class layer's initial weights: zero, or as model.init
# The paper's names, for tables and run names.
NAMES = {"base": "Model {F}", "strided": "Strided-CNN-{F}", "convpool": "ConvPool-CNN-{F}", "allcnn": "All-CNN-{F}"}
# Hydra option name of each network: conf/model/<key>.yaml
CONFIG_NAMES = {"base": "model_{f}", "strided": "strided_cnn_{f}", "convpool": "convpool_cnn_{f}",
                "allcnn": "all_cnn_{f}"}
BLOCK_WIDTHS = (96, 192)
HEAD_WIDTH = 192


def paper_name(family: str, variant: str) -> str:
    return NAMES[variant].format(F=family.upper())


def config_name(family: str, variant: str) -> str:
    return CONFIG_NAMES[variant].format(f=family)


class Row(NamedTuple):
    """One layer of a network: where it goes (block, name) and what it is.

    kind "conv": out channels, kernel, stride, padding; "pool": the 3x3 stride-2 max-pool; "drop":
    arg is "input" (the 20% input dropout) or "pool" (the 50% dropout after each downsampling step).
    """

    block: str  # "" (top level), "block1", "block2" or "head"
    name: str
    kind: str  # conv | pool | drop
    out: int = 0
    kernel: int = 0
    stride: int = 1
    pad: int = 0
    arg: str = ""


def layer_spec(family: str, variant: str, num_classes: int = 10) -> list[Row]:
    """The network as named rows, in build order (which is also the order of the random initialisation).

    Names: dropout_input; blockK.convN (the block's convolutions), blockK.down (the downsampling
    layer: the max-pool of base/convpool, the stride-2 conv of strided/allcnn), blockK.dropout;
    head.conv1, head.conv2, head.classes (the 1x1 conv to num_classes). build() adds a ReLU named
    after each conv (reluN, relu_down, relu_classes) and head.pool, head.flatten.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(FAMILIES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    spec = [Row("", "dropout_input", "drop", arg="input")]
    for b, width in enumerate(BLOCK_WIDTHS, start=1):
        block = f"block{b}"
        kernels = FAMILIES[family]
        for i, k in enumerate(kernels):
            if variant == "strided" and i == len(kernels) - 1:  # the block's last conv downsamples
                spec.append(Row(block, "down", "conv", width, k, 2, k // 2))
            else:
                spec.append(Row(block, f"conv{i + 1}", "conv", width, k, 1, k // 2))
        if variant == "convpool":
            spec.append(Row(block, f"conv{len(kernels) + 1}", "conv", width, 3, 1, 1))
        if variant in ("base", "convpool"):
            spec.append(Row(block, "down", "pool"))
        if variant == "allcnn":
            spec.append(Row(block, "down", "conv", width, 3, 2, 1))
        spec.append(Row(block, "dropout", "drop", arg="pool"))
    spec += [Row("head", "conv1", "conv", HEAD_WIDTH, 3, 1, 0), Row("head", "conv2", "conv", HEAD_WIDTH, 1, 1, 0),
             Row("head", "classes", "conv", num_classes, 1, 1, 0)]
    return spec


def _relu_name(conv_name: str) -> str:
    return "relu" + conv_name.removeprefix("conv") if conv_name.startswith("conv") else f"relu_{conv_name}"


def build(
    family: str,
    variant: str,
    num_classes: int = 10,
    width: float = 1.0,
    dropout_input: float = 0.2,
    dropout_pool: float = 0.5,
    final_relu: bool = True,
    init: str = "he",
    final_bias: float = 1.0,
    final_weights: str = "zero",
    pool_gain: bool = True,
    in_channels: int = 3,
) -> nn.Sequential:
    """Build one of the 12 networks: nn.Sequential(dropout_input, block1, block2, head) of standard layers.

    Every module has a name that says what it is (layer_spec): e.g. block2.down, head.classes.
    width scales every hidden layer's channels (1.0 = the paper); the class layer keeps
    num_classes. final_relu keeps the paper's ReLU after the class layer. init is "he"
    (Kaiming normal, fan-in), "xavier" or "default" (PyTorch's own); final_bias is the class
    layer's initial bias. With the final ReLU on, a positive final_bias starts every class map in
    the ReLU's linear region, so no class starts dead (see README, "Why it trains"); final_weights
    "zero" starts the class layer's weights at zero, so every class map starts at exactly final_bias
    whatever the input (the class layer learns first; the layers below from the next step). pool_gain
    divides the conv after each max-pool by the pool's gain (correct_pool_gain), so that He init
    keeps the signal's scale through the max-pooling networks too; it leaves the others untouched.
    """
    family, variant = str(family).lower(), str(variant).lower()
    if not (isinstance(width, (int, float)) and width > 0 and math.isfinite(width)):
        raise ValueError(f"model.width must be a positive number, got {width!r}")
    for name, p in (("dropout_input", dropout_input), ("dropout_pool", dropout_pool)):
        if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
            raise ValueError(f"model.{name} must be in [0, 1), got {p!r}")
    if init not in INITS:
        raise ValueError(f"unknown model.init {init!r}; allowed: {', '.join(INITS)}")
    if final_weights not in FINAL_WEIGHTS:
        raise ValueError(f"unknown model.final_weights {final_weights!r}; allowed: {', '.join(FINAL_WEIGHTS)}")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")

    groups: dict[str, OrderedDict[str, nn.Module]] = {"": OrderedDict()}
    channels = in_channels
    for row in layer_spec(family, variant, num_classes):
        layers = groups.setdefault(row.block, OrderedDict())
        if row.kind == "drop":
            layers[row.name] = nn.Dropout(dropout_input if row.arg == "input" else dropout_pool)
        elif row.kind == "pool":
            layers[row.name] = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            is_class_layer = row.name == "classes"
            out = row.out if is_class_layer else max(1, round(row.out * width))
            layers[row.name] = nn.Conv2d(channels, out, row.kernel, stride=row.stride, padding=row.pad)
            if not is_class_layer or final_relu:
                layers[_relu_name(row.name)] = nn.ReLU(inplace=True)
            channels = out
    groups["head"].update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten())
    top = groups.pop("")
    top.update((name, nn.Sequential(layers)) for name, layers in groups.items())
    net = nn.Sequential(top)
    _initialise(net, init, final_bias)
    if final_weights == "zero":
        nn.init.zeros_(net.head.classes.weight)
    if pool_gain:
        correct_pool_gain(net)
    return net


def _initialise(net: nn.Module, init: str, final_bias: float) -> None:
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    for m in convs:
        if init == "he":
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif init == "xavier":
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    if final_bias:
        nn.init.constant_(convs[-1].bias, final_bias)  # the class layer: the last conv


def correct_pool_gain(net: nn.Module, probe: torch.Tensor | None = None) -> list[float]:
    """Divide the weights of the conv after each max-pool by the pool's RMS gain; returns the gains.

    He init keeps a conv's output at its input's scale through ReLUs, but a 3x3 max-pool is not a
    ReLU: the largest of nine rectified values is about twice their RMS, so each pool doubles the
    signal and Model A's logits start ~4x too large (a first-step loss of 9.4 and a gradient norm of
    52 at width 0.25, against 2.5 and 1 for Strided-CNN-A). The gain is measured on `probe` (default:
    white Gaussian noise, which is what ZCA-whitened images look like to second order) in one pass:
    with zero hidden biases every layer up to the class layer is positively homogeneous, so scaling
    one conv leaves the gains of later pools unchanged. Networks without max-pooling are untouched.
    """
    leaves = [m for m in net.modules() if not list(m.children())]
    pools = [i for i, m in enumerate(leaves) if isinstance(m, nn.MaxPool2d)]
    if not pools or any(p.is_meta for p in net.parameters()):
        return []
    if probe is None:
        generator = torch.Generator().manual_seed(0)
        in_channels = next(m for m in leaves if isinstance(m, nn.Conv2d)).in_channels
        probe = torch.randn(64, in_channels, 32, 32, generator=generator)
    rms: dict[int, tuple[float, float]] = {}

    def measure(i: int):
        return lambda m, inp, out: rms.__setitem__(i, (inp[0].pow(2).mean().sqrt().item(),
                                                        out.pow(2).mean().sqrt().item()))

    hooks = [leaves[i].register_forward_hook(measure(i)) for i in pools]
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(probe.to(next(net.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    gains = []
    for i in pools:
        gain = rms[i][1] / rms[i][0]
        conv = next(m for m in leaves[i + 1:] if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            conv.weight.div_(gain)
        gains.append(gain)
    return gains


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def count_macs(net: nn.Module, image_size: int = 32, in_channels: int = 3) -> int:
    """Multiply-adds of one forward pass of one image (convolutions only; they are >99.9%)."""
    total = 0

    def hook(m: nn.Conv2d, _inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        total += out.shape[1] * out.shape[2] * out.shape[3] * k

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        was_training = net.training
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, in_channels, image_size, image_size))
        net.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return total


def all_networks() -> list[tuple[str, str]]:
    """The 12 (family, variant) pairs in the paper's table order."""
    return [(f, v) for f in FAMILIES for v in VARIANTS]


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="The 12 networks of Springenberg et al. (CIFAR-10, width 1.0)")
    for col in ("config", "network", "parameters", "multiply-adds / image", "train FLOP / epoch"):
        table.add_column(col, justify="right" if col not in ("config", "network") else "left")
    for f, v in all_networks():
        net = build(f, v)
        macs = count_macs(net)
        table.add_row(config_name(f, v), paper_name(f, v), f"{count_params(net):,}", f"{macs / 1e6:.1f}M",
                      f"{6 * macs * 50_000:.2e}")
    Console().print(table)


if __name__ == "__main__":
    main()
