"""Backprop, deconvnet and guided backprop (allconv.visualize): hand-computed values, the ReLU rules
against an independent autograd computation, no side effects on the model, the training callback.
The command (src/visualize.py) and the figures from a checkpoint: tests/test_figures.py."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch import nn

from allconv import checks, models
from allconv.visualize import (
    METHODS,
    VisualizeError,
    crop,
    receptive_field,
    reconstruct,
    top_activations,
    topk_figure,
)


def _conv(w) -> nn.Conv2d:
    """A 1x1 convolution without bias whose weight is the matrix w (out x in)."""
    w = torch.tensor(w, dtype=torch.float32)
    conv = nn.Conv2d(w.shape[1], w.shape[0], 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w[:, :, None, None])
    return conv


# -- hand-computed values --------------------------------------------------------------------------
def test_logits_hand_computed():
    # x = (1, 2); hidden f = W1 x = (-1, 4, 1); logit 0 sends R = W2[0] = (1, -1, 2) to the ReLU.
    net = nn.Sequential(_conv([[1, -1], [2, 1], [-1, 1]]), nn.ReLU(), _conv([[1, -1, 2], [-1, 1, -2]]), nn.Flatten())
    x = torch.tensor([1.0, 2.0]).reshape(1, 2, 1, 1)
    expected = {
        "backprop": [-4.0, 1.0],  # W1^T (R * (f > 0)) = W1^T (0, -1, 2)
        "deconvnet": [-1.0, 1.0],  # W1^T (R * (R > 0)) = W1^T (1, 0, 2)
        "guided": [-2.0, 2.0],  # W1^T (R * (f > 0) * (R > 0)) = W1^T (0, 0, 2)
    }
    for method, values in expected.items():
        got = reconstruct(net, x, unit=0, method=method)
        assert got.shape == x.shape
        assert torch.allclose(got.flatten(), torch.tensor(values)), method
    # unit=None is the predicted class: logits are (-2, 2), so class 1
    for method in METHODS:
        assert torch.equal(reconstruct(net, x, method=method), reconstruct(net, x, unit=1, method=method))


def test_channel_at_its_strongest_position_hand_computed():
    # Three positions; channels c = w1 * x; layer "2" = 2 relu(c0) + relu(c1) - relu(c2) (in-place ReLU).
    net = nn.Sequential(_conv([[1], [-1], [0.5]]), nn.ReLU(inplace=True), _conv([[2, 1, -1]]))
    x = torch.tensor([[1.0, -2.0, 3.0], [3.0, -2.0, 1.0]]).reshape(2, 1, 1, 3)
    # Image 0: layer "2" = (1.5, 2, 4.5), strongest at position 2, where f = (3, -3, 1.5) and R = (2, 1, -1).
    # Image 1 is image 0 mirrored, so its strongest position is 0 and the values mirror too.
    expected = {"backprop": 1.5, "deconvnet": 1.0, "guided": 2.0}  # w1 . R*(f>0) | w1 . R*(R>0) | w1 . R*(f>0)*(R>0)
    for method, value in expected.items():
        got = reconstruct(net, x, layer="2", unit=0, method=method)
        assert torch.allclose(got.reshape(2, 3), torch.tensor([[0, 0, value], [value, 0, 0]])), method


def test_max_pooling_routes_to_the_argmax():
    net = nn.Sequential(_conv([[2]]), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        net[4].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[4].bias.zero_()
    x = torch.tensor([[1.0, -3.0], [2.0, 0.5]]).reshape(1, 1, 2, 2)  # after ReLU: (2, 0; 4, 1), max at (1, 0)
    for method in METHODS:
        got = reconstruct(net, x, unit=0, method=method)
        assert torch.equal(got.reshape(2, 2), torch.tensor([[0.0, 0.0], [2.0, 0.0]])), method
    # Class 1 sends R = -1 down: the gradient passes it, deconvnet and guided block it.
    assert torch.equal(reconstruct(net, x, unit=1, method="backprop").reshape(2, 2), torch.tensor([[0, 0], [-2.0, 0]]))
    for method in ("deconvnet", "guided"):
        assert not reconstruct(net, x, unit=1, method=method).any()


# -- the rules against autograd --------------------------------------------------------------------
def _small_allcnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return models.build("c", "allcnn", width=0.125, final_bias=0.5)


def test_backprop_of_a_logit_is_the_gradient():
    net = _small_allcnn()  # in training mode: reconstruct must switch dropout off
    x = torch.randn(3, 3, 32, 32)
    ref = copy.deepcopy(net).eval()
    xr = x.clone().requires_grad_(True)
    out = ref(xr)
    pred = out.argmax(1)
    (grad,) = torch.autograd.grad(out[torch.arange(3), pred].sum(), xr)
    assert torch.allclose(reconstruct(net, x, method="backprop"), grad, rtol=1e-5, atol=1e-7)
    assert net.training


def test_guided_and_deconvnet_differ_from_backprop_exactly_where_the_rules_say():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    net = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(2, 3, 8, 8)
    # Independently: f below the only ReLU, R the gradient of logit 0 arriving from above.
    xr = x.clone().requires_grad_(True)
    f = conv(xr)
    a = f.detach().relu().requires_grad_(True)
    (r,) = torch.autograd.grad(net[2:](a)[:, 0].sum(), a)
    signals = {"backprop": r * (f > 0), "deconvnet": r * (r > 0), "guided": r * (f > 0) * (r > 0)}
    for method, signal in signals.items():
        (expected,) = torch.autograd.grad(f, xr, grad_outputs=signal.detach(), retain_graph=True)
        assert torch.allclose(reconstruct(net, x, unit=0, method=method), expected, atol=1e-6), method
    # guided drops the gradient exactly where f > 0 and R < 0; deconvnet adds R where f <= 0 and R > 0
    assert torch.equal(signals["backprop"] != signals["guided"], (f > 0) & (r < 0))
    assert torch.equal(signals["deconvnet"] != signals["guided"], (f <= 0) & (r > 0))
    assert ((f > 0) & (r < 0)).any() and ((f <= 0) & (r > 0)).any()


def test_inplace_and_plain_relu_give_the_same_result():
    net = _small_allcnn().eval()
    plain = copy.deepcopy(net)
    for m in plain.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(2, 3, 32, 32)
    for method in METHODS:
        for layer, unit in (("logits", None), ("block2.relu1", 2)):
            assert torch.allclose(reconstruct(net, x, layer, unit, method), reconstruct(plain, x, layer, unit, method))


# -- no side effects -------------------------------------------------------------------------------
def _hooks(net: nn.Module) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, n)) for m in net.modules() for n in names)


def _outputs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    modes = [m.training for m in net.modules()]
    net.eval()
    with torch.no_grad():
        out = net(x)
    for m, t in zip(net.modules(), modes, strict=True):
        m.training = t
    return out


def test_model_unchanged_and_no_hooks_left():
    net = _small_allcnn()
    net.block1.eval()  # a mixed mode must come back as it was
    x = torch.randn(4, 3, 32, 32)
    params = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    out = _outputs(net, x)
    for method in METHODS:
        reconstruct(net, x, method=method)
        reconstruct(net, x, layer="block1.relu2", unit=1, method=method)
        reconstruct(net, x, layer="block2.conv1", method=method)
    topk_figure(net, x, torch.zeros(4, 3, 32, 32, dtype=torch.uint8), "block1.relu2", k=2, num_channels=2)
    with pytest.raises(VisualizeError):
        reconstruct(net, x, layer="block1.relu2", unit=999)
    assert all(torch.equal(params[k], v) for k, v in net.state_dict().items())
    assert [m.training for m in net.modules()] == modes
    assert torch.equal(_outputs(net, x), out)
    assert _hooks(net) == 0
    assert all(p.grad is None for p in net.parameters())


def test_hooks_removed_and_mode_restored_on_error():
    class FailsOnSecondCall(nn.Module):  # the probe pass works, the attribution pass fails inside captum
        calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
            return x

    net = nn.Sequential(_conv([[1.0]]), nn.ReLU(), FailsOnSecondCall(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.train()
    with pytest.raises(RuntimeError, match="boom"):
        reconstruct(net, torch.randn(1, 1, 4, 4), layer="1", method="guided")
    assert _hooks(net) == 0 and all(m.training for m in net.modules())


# -- top activations and receptive fields ----------------------------------------------------------
def test_top_activations_streaming_equals_one_pass():
    net = _small_allcnn().eval()
    x = torch.randn(23, 3, 32, 32)
    top = top_activations(net, x, "block1.relu2", channels=[0, 3, 5], k=4, batch_size=7)
    with torch.no_grad():
        act = net.block1[:4](x)[:, [0, 3, 5]].flatten(2)  # conv1, relu1, conv2, relu2: (N, 3, positions)
    per_image, pos = act.max(-1)
    ref = per_image.T.topk(4, dim=1)
    assert torch.allclose(top.values, ref.values) and torch.equal(top.indices, ref.indices)
    ref_pos = pos.T.gather(1, ref.indices)
    assert torch.equal(top.positions[..., 0] * 32 + top.positions[..., 1], ref_pos)


def test_receptive_field_covers_the_gradient_support():
    net = _small_allcnn().eval()
    assert (receptive_field(net, "block1.conv1").size, receptive_field(net, "block1.conv2").size) == (3, 5)
    rf = receptive_field(net, "block2.conv1")  # after the stride-2 convolution
    assert (rf.size, rf.jump, rf.top) == (11, 2, -5)
    assert receptive_field(net, "logits").whole_image
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    r, c = 5, 9
    out = net.block2.conv1(net.block1(x))
    (g,) = torch.autograd.grad(out[0, :, r, c].sum(), x)
    rows, cols = g[0].abs().sum(0).nonzero(as_tuple=True)
    top = rf.top + r * rf.jump, rf.top + c * rf.jump
    assert rows.min() >= top[0] and rows.max() < top[0] + rf.size
    assert cols.min() >= top[1] and cols.max() < top[1] + rf.size
    patch = crop(x.detach(), torch.tensor([[r, c]]), rf)
    assert torch.equal(patch[0], x.detach()[0, :, top[0]:top[0] + 11, top[1]:top[1] + 11])


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(layer="conv9"), r"unknown layer 'conv9'; allowed: logits, dropout_input, block1, block1\.conv1, "),
    (dict(layer="block1.relu2", unit=12), r"unit 12 is out of range for layer 'block1.relu2': allowed 0\.\.11"),
    (dict(unit=10), r"unit 10 is out of range for layer 'logits': allowed 0\.\.9"),
    (dict(method="lrp"), r"unknown method 'lrp'; allowed: guided, deconvnet, backprop"),
    (dict(images=torch.zeros(3, 32, 32)), r"images must be .* \(N, C, H, W\), got \(3, 32, 32\)"),
    (dict(images=torch.zeros(1, 1, 32, 32)), r"images have 1 channels, the model takes 3"),
    (dict(images=torch.zeros(1, 3, 2, 2)), r"do not fit the model"),
])
def test_bad_input_is_one_line(kwargs, match):
    net = _small_allcnn()
    images = kwargs.pop("images", torch.zeros(2, 3, 32, 32))
    with pytest.raises(VisualizeError, match=match) as e:
        reconstruct(net, images, **kwargs)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)
    assert _hooks(net) == 0 and net.training


# -- the callback ----------------------------------------------------------------------------------
SMALL = dict(family="c", variant="allcnn", width=0.125, final_bias=0.5)  # _small_allcnn's network


def test_callback_writes_its_grid_and_the_filters_during_fast_dev_run(tmp_path, make_npz):
    import lightning as L
    from PIL import Image

    from allconv.data import CIFARDataModule
    from allconv.module import AllConvModule
    from allconv.visualize_callback import GuidedBackpropGrid

    dm = CIFARDataModule(source="npz", path=str(make_npz(n_train=32, n_test=8)), preprocess="standardize",
                         batch_size=16, cache_dir=str(tmp_path / "zca"))
    module = AllConvModule(SMALL, num_classes=10)
    cb = GuidedBackpropGrid(run_dir=tmp_path, every_n_epochs=1, num_images=3)
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", callbacks=[cb], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    pngs = sorted((tmp_path / "guided_backprop").glob("*.png"))
    assert [p.name for p in pngs] == ["epoch_001.png"]
    w, h = Image.open(pngs[0]).size
    assert (w, h) == (4 * 64 + 5 * 2, 3 * 64 + 4 * 2)  # 3 rows of image | backprop | deconvnet | guided
    filters = [tmp_path / "filters" / "block1.conv1.png", tmp_path / "filters" / "block1.conv2.png"]
    assert cb.written == pngs + filters
    # 12 filters of 3x3 each (width 0.125): 4 tiles a row, 3 rows of 24-pixel tiles with 1-pixel gaps
    assert [Image.open(p).size for p in filters] == [(4 * 25 + 1, 3 * 25 + 1)] * 2


def test_callback_without_filters(tmp_path):
    from allconv.module import AllConvModule
    from allconv.visualize_callback import GuidedBackpropGrid

    cb = GuidedBackpropGrid(run_dir=tmp_path, filters=False)
    cb._filters(SimpleNamespace(is_global_zero=True, loggers=[]), AllConvModule(SMALL, num_classes=10))
    assert cb.written == [] and not (tmp_path / "filters").exists()


def test_callback_logs_to_wandb_and_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    from allconv.module import AllConvModule
    from allconv.visualize_callback import GuidedBackpropGrid

    wandb, tb = mock.MagicMock(spec=WandbLogger), mock.MagicMock(spec=TensorBoardLogger)
    tb.experiment = mock.MagicMock()
    cb = GuidedBackpropGrid(run_dir=tmp_path)
    picture = torch.zeros(3, 8, 8)
    trainer = SimpleNamespace(loggers=[wandb, tb], global_step=7, is_global_zero=True)
    cb._log(trainer, picture, tmp_path / "x.png")
    wandb.log_image.assert_called_once()
    assert wandb.log_image.call_args.kwargs["step"] == 7
    tb.experiment.add_image.assert_called_once_with("guided_backprop", picture, global_step=7)
    cb._filters(trainer, AllConvModule(SMALL, num_classes=10))
    keys = [c.kwargs["key"] for c in wandb.log_image.call_args_list]
    assert keys == ["guided_backprop", "filters/block1.conv1", "filters/block1.conv2"]
    assert [c.args[0] for c in tb.experiment.add_image.call_args_list] == keys


def test_callback_layer_is_checked_before_training(compose_cfg, tmp_path):
    """The run's pre-flight check (checks.check, on the meta device) rejects the callback's bad layer."""
    from allconv.errors import ConfigError
    from conftest import write_npz

    npz = write_npz(tmp_path / "d.npz")
    cfg = compose_cfg("data=npz", f"data.path={npz}", "callbacks.guided_backprop.layer=nope")
    with pytest.raises(ConfigError, match="callbacks.guided_backprop: unknown layer 'nope'"):
        checks.check(cfg)
