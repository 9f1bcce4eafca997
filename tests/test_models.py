"""The 12 networks against PAPER.md: parameter counts, shapes, layer facts, width, multiply-adds."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from allconv import models

FAMS, VARS = ("a", "b", "c"), ("base", "strided", "convpool", "allcnn")
ALL = [(f, v) for f in FAMS for v in VARS]

# PAPER.md, "Parameter counts (weights + biases)".
PAPER_PARAMS = {
    ("a", "base"): 839_242, ("a", "strided"): 839_242, ("a", "convpool"): 1_254_250, ("a", "allcnn"): 1_254_250,
    ("b", "base"): 885_610, ("b", "strided"): 885_610, ("b", "convpool"): 1_300_618, ("b", "allcnn"): 1_300_618,
    ("c", "base"): 954_730, ("c", "strided"): 954_730, ("c", "convpool"): 1_369_738, ("c", "allcnn"): 1_369_738,
}
# PAPER.md, first table: kernel sizes of each block's convolutions.
PAPER_BLOCK_KERNELS = {"a": [5], "b": [5, 1], "c": [3, 3]}


def paper_convs(family: str, variant: str, num_classes: int = 10, width: float = 1.0) -> list[tuple[int, int, int]]:
    """(out_channels, kernel, stride) of every conv, written from PAPER.md's tables (independent of layer_spec)."""
    convs = []
    for w in (96, 192):
        w = max(1, round(w * width))
        kernels = PAPER_BLOCK_KERNELS[family]
        for i, k in enumerate(kernels):
            convs.append((w, k, 2 if variant == "strided" and i == len(kernels) - 1 else 1))
        if variant == "convpool":
            convs.append((w, 3, 1))
        if variant == "allcnn":
            convs.append((w, 3, 2))
    h = max(1, round(192 * width))
    return convs + [(h, 3, 1), (h, 1, 1), (num_classes, 1, 1)]


def reference_params(family: str, variant: str, num_classes: int = 10, width: float = 1.0) -> int:
    total, cin = 0, 3
    for out, k, _ in paper_convs(family, variant, num_classes, width):
        total += k * k * cin * out + out
        cin = out
    return total


def convs_of(net: nn.Module) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


def leaves(net: nn.Module) -> list[nn.Module]:
    """The layers in forward order (the nets nest nn.Sequential blocks)."""
    return [m for m in net.modules() if not any(True for _ in m.children())]


@pytest.mark.parametrize("family,variant", ALL)
def test_parameter_counts_equal_paper(family, variant):
    net = models.build(family, variant)
    assert models.count_params(net) == PAPER_PARAMS[(family, variant)]
    assert reference_params(family, variant) == PAPER_PARAMS[(family, variant)]  # the test's reading of the tables


def test_all_networks_lists_the_twelve_and_each_has_a_config():
    from conftest import CONF

    assert sorted(models.all_networks()) == sorted(ALL)
    names = {models.config_name(f, v) for f, v in ALL}
    assert len(names) == 12
    assert names == {p.stem for p in (CONF / "model").glob("*.yaml")}


@pytest.mark.parametrize("family,variant", ALL)
def test_output_shapes_and_spatial_sizes(family, variant):
    for num_classes in (10, 100):
        net = models.build(family, variant, num_classes=num_classes, width=0.25).eval()  # sizes do not depend on width
        sizes: list[tuple[str, int]] = []

        def hook(m, inp, out, sizes=sizes):
            sizes.append((type(m).__name__, inp[0].shape[-1], getattr(m, "p", None)))

        handles = [m.register_forward_hook(hook) for m in net.modules()
                   if isinstance(m, (nn.Dropout, nn.AdaptiveAvgPool2d))]
        with torch.no_grad():
            out = net(torch.randn(2, 3, 32, 32))
        for h in handles:
            h.remove()
        assert out.shape == (2, num_classes)
        # input dropout sees 32x32, each 50% dropout follows a downsampling step (16, then 8), head ends at 6x6
        assert sizes == [("Dropout", 32, 0.2), ("Dropout", 16, 0.5), ("Dropout", 8, 0.5),
                         ("AdaptiveAvgPool2d", 6, None)]


@pytest.mark.parametrize("family,variant", ALL)
def test_layer_facts(family, variant):
    net = models.build(family, variant)
    got = [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs_of(net)]
    assert got == paper_convs(family, variant)
    for c in convs_of(net):
        assert c.kernel_size[0] == c.kernel_size[1] and c.stride[0] == c.stride[1]
    head = convs_of(net)[-3:]
    assert head[0].padding == (0, 0)  # 8x8 -> 6x6
    for c in convs_of(net)[:-3]:
        assert c.padding[0] == c.kernel_size[0] // 2  # "same"
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    if variant in ("base", "convpool"):
        assert len(pools) == 2
        assert all(p.kernel_size == 3 and p.stride == 2 for p in pools)
    else:
        assert pools == []
        assert sum(c.stride[0] == 2 for c in convs_of(net)) == 2
    if variant == "allcnn":  # review erratum: the second downsampling conv is 192 wide, 3x3 stride 2
        stride2 = [c for c in convs_of(net) if c.stride[0] == 2]
        assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in stride2] == [(96, 96, 3), (192, 192, 3)]


@pytest.mark.parametrize("family,variant", ALL)
def test_dropout_and_relu_placement(family, variant):
    for final_relu in (True, False):
        layers = leaves(models.build(family, variant, final_relu=final_relu, dropout_input=0.2, dropout_pool=0.5))
        assert isinstance(layers[0], nn.Dropout) and layers[0].p == 0.2
        drops = [i for i, m in enumerate(layers) if isinstance(m, nn.Dropout)]
        assert len(drops) == 3
        for i in drops[1:]:
            assert layers[i].p == 0.5
            prev = layers[i - 1]
            # after a pool, or after the ReLU of the stride-2 conv that replaces it
            if isinstance(prev, nn.MaxPool2d):
                assert variant in ("base", "convpool")
            else:
                assert isinstance(prev, nn.ReLU) and isinstance(layers[i - 2], nn.Conv2d)
                assert layers[i - 2].stride == (2, 2)
        conv_idx = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
        for i in conv_idx[:-1]:
            assert isinstance(layers[i + 1], nn.ReLU)
        after_class = layers[conv_idx[-1] + 1]
        assert isinstance(after_class, nn.ReLU) == final_relu


def test_dropout_rates_are_knobs():
    layers = leaves(models.build("c", "allcnn", dropout_input=0.1, dropout_pool=0.3))
    assert [m.p for m in layers if isinstance(m, nn.Dropout)] == [0.1, 0.3, 0.3]


@pytest.mark.parametrize("family,variant", ALL)
def test_standard_layers_only(family, variant):
    net = models.build(family, variant, width=0.25)
    # forward is exactly the chain of its leaves: nn.Sequential all the way down
    assert all(type(m) is nn.Sequential for m in net.modules() if any(True for _ in m.children()))
    allowed = (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Dropout, nn.AdaptiveAvgPool2d, nn.Flatten)
    for m in leaves(net):
        assert type(m) in allowed, type(m)
    # the chain of leaves reproduces the forward pass, so no hidden functional ReLU exists
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    y = x
    for m in leaves(net):
        y = m(y)
    with torch.no_grad():
        assert torch.equal(net(x), y.detach())


@pytest.mark.parametrize("width", [0.5, 0.25, 2.0])
def test_width_multiplier(width):
    for f, v in (("a", "base"), ("c", "allcnn"), ("b", "convpool")):
        net = models.build(f, v, width=width)
        got = [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs_of(net)]
        assert got == paper_convs(f, v, width=width)
        assert convs_of(net)[-1].out_channels == 10  # the class layer keeps num_classes
        assert models.count_params(net) == reference_params(f, v, width=width)
        with torch.no_grad():
            assert net.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_all_cnn_c_multiply_adds():
    net = models.build("c", "allcnn")
    macs = models.count_macs(net)
    # independent count: out_h * out_w * out_ch * k * k * in_ch per conv, sizes 32 -> 16 -> 8 -> 6
    expected = (32 * 32 * 96 * 27 + 32 * 32 * 96 * 864 + 16 * 16 * 96 * 864 + 16 * 16 * 192 * 864
                + 16 * 16 * 192 * 1728 + 8 * 8 * 192 * 1728 + 6 * 6 * 192 * 1728 + 6 * 6 * 192 * 192 + 6 * 6 * 10 * 192)
    assert macs == expected
    assert round(macs / 1e6, 1) == 270.8


# Multiply-adds per 32x32 image at width 1, CIFAR-10 (exact; README's table rounds them to 0.1M).
MACS = {
    ("a", "base"): 138_677_760, ("a", "strided"): 44_674_560, ("a", "convpool"): 308_547_072,
    ("a", "allcnn"): 181_145_088, ("b", "base"): 157_552_128, ("b", "strided"): 143_396_352,
    ("b", "convpool"): 327_421_440, ("b", "allcnn"): 200_019_456, ("c", "base"): 228_331_008,
    ("c", "strided"): 100_929_024, ("c", "convpool"): 398_200_320, ("c", "allcnn"): 270_798_336,
}


def reference_macs(family: str, variant: str) -> int:
    """From paper_convs: block 1 convs see 32x32, block 2 16x16, the head 8x8 -> 6x6; stride 2 halves the output."""
    per_block = len(PAPER_BLOCK_KERNELS[family]) + (variant in ("convpool", "allcnn"))
    total, cin = 0, 3
    for i, (out, k, stride) in enumerate(paper_convs(family, variant)):
        size = 32 if i < per_block else 16 if i < 2 * per_block else 6
        total += (size // stride) ** 2 * out * k * k * cin
        cin = out
    return total


def test_multiply_adds_of_the_twelve_against_the_table_and_readme():
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    rows = {m.group(1).lower(): m.group(2) for m in re.finditer(r"^\| ([ABC]) \|(.*)\|$", readme, re.M)}
    assert sorted(rows) == ["a", "b", "c"], "README's table of the 12 networks (rows A, B, C) not found"
    for (family, variant), macs in MACS.items():
        assert models.count_macs(models.build(family, variant)) == macs, (family, variant)
        assert reference_macs(family, variant) == macs, (family, variant)
        cell = rows[family].split("|")[VARS.index(variant)]
        assert f"· {macs / 1e6:.1f}M" in cell, (family, variant, cell)
        assert f"{PAPER_PARAMS[(family, variant)]:,} ·" in cell, (family, variant, cell)



# -- names -------------------------------------------------------------------------------------------
def test_names_of_all_cnn_c():
    modules = dict(models.build("c", "allcnn").named_modules())
    down = modules["block2.down"]
    assert isinstance(down, nn.Conv2d) and down.stride == (2, 2) and down.out_channels == 192
    classes = modules["head.classes"]
    assert isinstance(classes, nn.Conv2d) and classes.out_channels == 10 and classes.kernel_size == (1, 1)
    assert isinstance(modules["block1.down"], nn.Conv2d) and modules["block1.down"].out_channels == 96
    assert [n for n in modules if n.startswith("block1.conv")] == ["block1.conv1", "block1.conv2"]
    assert isinstance(modules["dropout_input"], nn.Dropout) and isinstance(modules["head.pool"], nn.AdaptiveAvgPool2d)
    assert isinstance(modules["block2.relu_down"], nn.ReLU) and isinstance(modules["head.relu_classes"], nn.ReLU)


def test_names_of_model_c():
    modules = dict(models.build("c", "base").named_modules())
    assert isinstance(modules["block1.down"], nn.MaxPool2d) and isinstance(modules["block2.down"], nn.MaxPool2d)
    assert isinstance(modules["block2.dropout"], nn.Dropout) and modules["block2.dropout"].p == 0.5


@pytest.mark.parametrize("family,variant", ALL)
def test_every_network_names_its_downsampling_and_class_layers(family, variant):
    net = models.build(family, variant, width=0.125, num_classes=100)
    modules = dict(net.named_modules())
    kinds = {"base": nn.MaxPool2d, "convpool": nn.MaxPool2d, "strided": nn.Conv2d, "allcnn": nn.Conv2d}
    for block in ("block1", "block2"):
        down = modules[f"{block}.down"]
        assert type(down) is kinds[variant]
        assert (down.stride if isinstance(down, nn.Conv2d) else (down.stride,) * 2) == (2, 2)
        # the dropout after downsampling follows it in the block
        names = [n for n in modules if n.startswith(block + ".")]
        assert names[-1] == f"{block}.dropout" and names.index(f"{block}.down") < len(names) - 1
    assert modules["head.classes"] is convs_of(net)[-1] and modules["head.classes"].out_channels == 100
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    # every conv is blockK.convN, blockK.down or head.convN / head.classes
    assert all(re.fullmatch(r"(block[12]|head)\.(conv\d|down|classes)", n) for n in convs), convs
    # spatial sizes at the names: 32 -> 16 after block1.down, 8 after block2.down
    sizes: dict[str, int] = {}

    def record(name):
        def hook(_m, _inp, out):
            sizes[name] = out.shape[-1]
        return hook

    hooks = [modules[n].register_forward_hook(record(n)) for n in ("block1.down", "block2.down")]
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert sizes == {"block1.down": 16, "block2.down": 8}


@pytest.mark.parametrize("family,variant", [("a", "strided"), ("b", "convpool"), ("c", "allcnn")])
def test_initialisation_draws_in_forward_order(family, variant):
    """The nested, named build draws the same random numbers as a flat chain of its convs built in order."""
    torch.manual_seed(0)
    net = models.build(family, variant, width=0.25, final_weights="init", pool_gain=False)  # He init, every conv
    torch.manual_seed(0)
    flat, cin = [], 3
    for out, k, stride in paper_convs(family, variant, width=0.25):
        flat.append(nn.Conv2d(cin, out, k, stride=stride, padding=k // 2))  # construction draws too
        cin = out
    for conv in flat:
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    for got, ref in zip(convs_of(net), flat, strict=True):
        assert torch.equal(got.weight, ref.weight)


def _rms_into(net, name: str, x: torch.Tensor) -> float:
    seen = {}
    hook = dict(net.named_modules())[name].register_forward_hook(
        lambda m, i, o: seen.__setitem__("rms", i[0].pow(2).mean().sqrt().item()))
    with torch.no_grad():
        net.eval()(x)
    hook.remove()
    return seen["rms"]


@pytest.mark.parametrize("family, variant", models.all_networks())
def test_pool_gain_scales_only_the_conv_after_each_max_pool_by_that_pools_gain(family, variant):
    torch.manual_seed(0)
    plain = models.build(family, variant, width=0.25, final_bias=1.0, final_weights="init", pool_gain=False)
    torch.manual_seed(0)
    fixed = models.build(family, variant, width=0.25, final_bias=1.0, final_weights="init", pool_gain=True)
    p, q = plain.state_dict(), fixed.state_dict()
    changed = sorted(k for k in p if not torch.equal(p[k], q[k]))
    if variant in ("strided", "allcnn"):  # no max-pool: He init as before, bit for bit
        assert changed == []
        return
    assert changed == ["block2.conv1.weight", "head.conv1.weight"]
    noise = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # what correct_pool_gain probes
    for pool, conv in (("block1.down", "block2.conv1"), ("block2.down", "head.conv1")):
        seen = {}
        hook = dict(plain.named_modules())[pool].register_forward_hook(
            lambda m, i, o, seen=seen: seen.update(gain=(o.pow(2).mean() / i[0].pow(2).mean()).sqrt().item()))
        with torch.no_grad():
            plain.eval()(noise)
        hook.remove()
        assert 1.3 < seen["gain"] < 2.5  # the largest of nine rectified values is about twice their RMS
        torch.testing.assert_close(q[f"{conv}.weight"], p[f"{conv}.weight"] / seen["gain"])


@pytest.mark.parametrize("family", ["a", "b", "c"])
@pytest.mark.parametrize("variant", ["base", "convpool"])
def test_pool_gain_brings_the_class_layer_input_to_the_scale_of_the_pool_free_networks(family, variant):
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rms = {}
    for key, v, gain in (("plain", variant, False), ("fixed", variant, True), ("strided", "strided", False)):
        torch.manual_seed(0)
        rms[key] = _rms_into(models.build(family, v, width=0.25, pool_gain=gain), "head.classes", x)
    assert rms["plain"] > 2 * rms["fixed"]  # two pools, each ~1.5-2x: the logits of Model A start ~3x too large
    assert rms["strided"] / 2.5 < rms["fixed"] < rms["strided"] * 1.5  # width 0.25: He init itself varies ~2x


def test_pool_gain_is_on_by_default(compose_cfg):
    from allconv import training

    cfg = compose_cfg("model=model_a")
    assert cfg.model.pool_gain is True and training.net_kwargs(cfg)["pool_gain"] is True


@pytest.mark.parametrize("family, variant", [("a", "convpool"), ("c", "allcnn")])
def test_final_weights_zero_starts_every_class_map_at_the_final_bias(family, variant):
    torch.manual_seed(0)
    init = models.build(family, variant, width=0.25, final_bias=1.0, final_weights="init", pool_gain=False)
    torch.manual_seed(0)
    zero = models.build(family, variant, width=0.25, final_bias=1.0, final_weights="zero", pool_gain=False)
    assert (zero.head.classes.weight == 0).all() and (init.head.classes.weight != 0).any()
    assert (zero.head.classes.bias == 1.0).all()
    a, b = init.state_dict(), zero.state_dict()  # the layers below are initialised as before
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("head.classes.weight"))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(zero.eval()(x), torch.ones(8, 10))  # every class active, equal logits: loss ln 10
    with pytest.raises(ValueError, match="unknown model.final_weights 'ones'; allowed: zero, init"):
        models.build(family, variant, final_weights="ones")


def test_final_weights_zero_is_the_default(compose_cfg):
    from allconv import training

    assert training.net_kwargs(compose_cfg())["final_weights"] == "zero"
