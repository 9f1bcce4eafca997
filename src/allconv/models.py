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

import torch
from torch import nn

# Kernel sizes of each feature block's convolutions, per family.
FAMILIES: dict[str, tuple[int, ...]] = {"a": (5,), "b": (5, 1), "c": (3, 3)}
VARIANTS = ("base", "strided", "convpool", "allcnn")
INITS = ("he", "xavier", "default")
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


def layer_spec(family: str, variant: str, num_classes: int = 10) -> list[tuple]:
    """The network as a list of ("conv", out, kernel, stride, pad) / ("pool",) / ("drop", block) rows.

    ("drop", "input") is the 20% input dropout; ("drop", "pool") the 50% dropout after each
    downsampling step (a pool, or the stride-2 conv that replaces it).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(FAMILIES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    spec: list[tuple] = [("drop", "input")]
    for width in BLOCK_WIDTHS:
        kernels = FAMILIES[family]
        for i, k in enumerate(kernels):
            last = i == len(kernels) - 1
            stride = 2 if (variant == "strided" and last) else 1
            spec.append(("conv", width, k, stride, k // 2))
        if variant == "convpool":
            spec.append(("conv", width, 3, 1, 1))
        if variant in ("base", "convpool"):
            spec.append(("pool",))
        if variant == "allcnn":
            spec.append(("conv", width, 3, 2, 1))
        spec.append(("drop", "pool"))
    spec += [("conv", HEAD_WIDTH, 3, 1, 0), ("conv", HEAD_WIDTH, 1, 1, 0), ("conv", num_classes, 1, 1, 0)]
    return spec


def build(
    family: str,
    variant: str,
    num_classes: int = 10,
    width: float = 1.0,
    dropout_input: float = 0.2,
    dropout_pool: float = 0.5,
    final_relu: bool = True,
    init: str = "he",
    final_bias: float = 0.0,
    in_channels: int = 3,
) -> nn.Sequential:
    """Build one of the 12 networks as an nn.Sequential of standard layers.

    width scales every hidden layer's channels (1.0 = the paper); the class layer keeps
    num_classes. final_relu keeps the paper's ReLU after the class layer. init is "he"
    (Kaiming normal, fan-in), "xavier" or "default" (PyTorch's own); final_bias is the class
    layer's initial bias. With the final ReLU on, a positive final_bias starts every class map in
    the ReLU's linear region, so no class starts dead (see README, "Why it trains").
    """
    family, variant = str(family).lower(), str(variant).lower()
    if not (isinstance(width, (int, float)) and width > 0 and math.isfinite(width)):
        raise ValueError(f"model.width must be a positive number, got {width!r}")
    for name, p in (("dropout_input", dropout_input), ("dropout_pool", dropout_pool)):
        if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
            raise ValueError(f"model.{name} must be in [0, 1), got {p!r}")
    if init not in INITS:
        raise ValueError(f"unknown model.init {init!r}; allowed: {', '.join(INITS)}")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")

    spec = layer_spec(family, variant, num_classes)
    layers: list[nn.Module] = []
    channels = in_channels
    n_convs = sum(row[0] == "conv" for row in spec)
    seen_convs = 0
    for row in spec:
        if row[0] == "drop":
            layers.append(nn.Dropout(dropout_input if row[1] == "input" else dropout_pool))
        elif row[0] == "pool":
            layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        else:
            _, out, k, stride, pad = row
            seen_convs += 1
            is_class_layer = seen_convs == n_convs
            out = out if is_class_layer else max(1, round(out * width))
            layers.append(nn.Conv2d(channels, out, k, stride=stride, padding=pad))
            if not is_class_layer or final_relu:
                layers.append(nn.ReLU(inplace=True))
            channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    net = nn.Sequential(*layers)
    _initialise(net, init, final_bias)
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
        nn.init.constant_(convs[-1].bias, final_bias)


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
