"""The paper's recipe as the DEFAULT config composes it (PAPER.md, "Training recipe"): the optimiser and the
schedule from module.configure_optimizers(), the initialisation and the head of the built network.

Nothing here types a recipe value into the config: every object comes from `compose("train")` with no
overrides, so a changed default in conf/ fails one of these tests.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from allconv import training

PAPER_LR = 0.05  # the default of the four rates the paper chooses from
# epoch -> learning rate in force during that epoch: x0.1 after epochs 200, 250 and 300 of 350.
SCHEDULE = {0: PAPER_LR, 199: PAPER_LR, 200: PAPER_LR * 0.1, 249: PAPER_LR * 0.1, 250: PAPER_LR * 0.01,
            299: PAPER_LR * 0.01, 300: PAPER_LR * 0.001, 349: PAPER_LR * 0.001}


@pytest.fixture(scope="module")
def default_cfg():
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train")


@pytest.fixture(scope="module")
def default_module(default_cfg):
    L.seed_everything(0, verbose=False)
    return training.build_module(default_cfg)


def convs(net: nn.Module) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


def test_default_is_all_cnn_c_at_full_width_for_350_epochs(default_cfg):
    assert (default_cfg.model.family, default_cfg.model.variant, default_cfg.model.width) == ("c", "allcnn", 1.0)
    assert default_cfg.trainer.max_epochs == 350
    assert (default_cfg.model.dropout_input, default_cfg.model.dropout_pool) == (0.2, 0.5)


def test_sgd_momentum_weight_decay_nesterov(default_module):
    conf = default_module.configure_optimizers()
    opt = conf["optimizer"]
    assert type(opt) is torch.optim.SGD
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["momentum"] == 0.9
    assert group["weight_decay"] == 1e-3
    assert group["nesterov"] is False
    assert group["lr"] == PAPER_LR
    # every weight and bias of the network is optimised with that decay, nothing else
    assert {id(p) for p in group["params"]} == {id(p) for p in default_module.net.parameters()}


def test_learning_rate_schedule_by_epoch(default_module):
    conf = default_module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"].get("interval", "epoch") == "epoch"  # Lightning steps it once per epoch
    lr_at = {}
    for epoch in range(350):
        lr_at[epoch] = opt.param_groups[0]["lr"]
        opt.step()  # no gradients: changes nothing, keeps torch's step-order check quiet
        sched.step()
    for epoch, lr in SCHEDULE.items():
        assert lr_at[epoch] == pytest.approx(lr, rel=1e-9), (epoch, lr_at[epoch], lr)
    assert sorted({round(v, 12) for v in lr_at.values()}, reverse=True) == [
        pytest.approx(PAPER_LR * f) for f in (1, 0.1, 0.01, 0.001)]


def test_he_initialisation_std(default_module):
    """Each hidden conv's weights ~ N(0, 2 / fan_in) (Kaiming normal, fan-in), within 10% of sqrt(2 / fan_in);
    the class layer's start at zero (model.final_weights=zero, the default)."""
    cs = convs(default_module.net)
    assert len(cs) == 9
    assert torch.count_nonzero(cs[-1].weight).item() == 0
    for c in cs[:-1]:
        fan_in = c.in_channels * c.kernel_size[0] * c.kernel_size[1]
        want = math.sqrt(2.0 / fan_in)
        got = c.weight.detach().std().item()
        assert abs(got - want) <= 0.1 * want, (c, got, want)
        assert abs(c.weight.detach().mean().item()) < 0.1 * want


def test_hidden_biases_zero_class_bias_one(default_module):
    *hidden, classes = convs(default_module.net)
    for c in hidden:
        assert torch.count_nonzero(c.bias).item() == 0, c
    assert classes.out_channels == 10
    assert torch.equal(classes.bias.detach(), torch.full((10,), 1.0))


def test_final_relu_after_the_class_layer(default_module):
    net = default_module.net
    leaves = [m for m in net.modules() if not list(m.children())]
    i = max(k for k, m in enumerate(leaves) if isinstance(m, nn.Conv2d))
    assert isinstance(leaves[i + 1], nn.ReLU), leaves[i + 1:]
    # and it acts: the class maps are rectified before the global average, so no logit is negative
    seen = []
    hook = leaves[i].register_forward_hook(lambda m, inp, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            out = net.eval()(torch.randn(8, 3, 32, 32) * 3)
    finally:
        hook.remove()
    assert (out >= 0).all()
    assert torch.allclose(out, seen[0].clamp(min=0).mean(dim=(2, 3)), atol=1e-6)
