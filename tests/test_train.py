"""Every model option composes and trains (fast_dev_run); the CLI writes metrics.json; seeds; non-finite loss."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch

from allconv import callbacks as C
from allconv import checks, models, training
from conftest import last_line, write_npz

OPTIONS = [models.config_name(f, v) for f, v in models.all_networks()]


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("data") / "tiny.npz", n_train=48, n_test=20)


def base_overrides(npz, cache, *extra):
    return ["data=npz", f"data.path={npz}", f"data.cache_dir={cache}", "model.width=0.125", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false", "callbacks.progress_bar=none", "data.batch_size=16",
            "data.eval_batch_size=16", *extra]


@pytest.mark.parametrize("option", OPTIONS)
def test_every_model_option_composes_and_runs_fast_dev_run(compose_cfg, tiny_npz, shared_cache_dir, tmp_path, option):
    cfg = compose_cfg(*base_overrides(tiny_npz, shared_cache_dir, f"model={option}", "data.preprocess=none",
                                      "trainer.fast_dev_run=true", "logger=none"))
    family, variant = next((f, v) for f, v in models.all_networks() if models.config_name(f, v) == option)
    assert (cfg.model.family, cfg.model.variant) == (family, variant)
    net = training.build_module(cfg).net
    assert models.count_params(net) == models.count_params(models.build(family, variant, width=0.125))
    metrics = training.train(cfg, tmp_path / "run")
    assert metrics["model"] == option
    assert 0.0 <= metrics["test_error"] <= 1.0
    assert "val_error" not in metrics  # no split (data.val_size=0), no validation error


def test_the_test_measures_whether_the_output_depends_on_the_image():
    """A network whose output is one number whatever the image is what the grid report calls dead."""
    from torch.utils.data import DataLoader, TensorDataset

    from allconv.module import AllConvModule

    generator = torch.Generator().manual_seed(0)
    images = DataLoader(TensorDataset(torch.randn(48, 3, 32, 32, generator=generator),
                                      torch.randint(0, 10, (48,), generator=generator)), batch_size=16)
    module = AllConvModule(net={"family": "c", "variant": "allcnn", "width": 0.125, "final_weights": "init"})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, images, verbose=False)
    spread = trainer.callback_metrics["test/score_spread"]
    assert spread > 1e-3  # He class weights: the scores follow the image
    with torch.no_grad():
        module.net.block2.down.bias.fill_(-1e3)  # every ReLU of block2.down dead: nothing of the image gets through
    trainer.test(module, images, verbose=False)
    assert trainer.callback_metrics["test/score_spread"] == 0  # measured afresh, not the last test's range


def test_variant_override_on_a_model_option(compose_cfg, tiny_npz, shared_cache_dir):
    cfg = compose_cfg(*base_overrides(tiny_npz, shared_cache_dir, "model=all_cnn_c", "model/variant=strided",
                                      "model.width=1.0"))
    assert (cfg.model.family, cfg.model.variant) == ("c", "strided")
    net = training.build_module(cfg).net
    assert models.count_params(net) == 954_730  # Strided-CNN-C
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    cfg100 = compose_cfg("data=cifar100", "model=model_a")
    assert cfg100.data.num_classes == 100
    assert training.build_module(cfg100).net(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


def test_cli_run_writes_metrics_json(run_train, tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    rc, out, err = run_train(*base_overrides(tiny_npz, tmp_path / "zca", "model=model_a", "trainer.max_epochs=1",
                                             "data.val_size=8", "optim.lr=0.01", "seed=3", f"hydra.run.dir={run_dir}"))
    assert rc == 0, err[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("model", "data", "lr", "seed", "params", "test_error", "wall_time_s", "val_error",
                "test_score_spread"):
        assert key in metrics, key
    assert metrics["test_score_spread"] > 0
    assert metrics["model"] == "model_a" and metrics["data"] == "npz"
    assert metrics["lr"] == 0.01 and metrics["seed"] == 3
    assert metrics["params"] == models.count_params(models.build("a", "base", width=0.125))
    assert 0.0 <= metrics["test_error"] <= 1.0
    assert abs(metrics["test_error"] * 20 - round(metrics["test_error"] * 20)) < 1e-4  # a fraction of 20 test images
    assert 0.0 <= metrics["val_error"] <= 1.0
    assert abs(metrics["val_error"] * 8 - round(metrics["val_error"] * 8)) < 1e-4
    assert metrics["wall_time_s"] > 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "zca").glob("zca-*.pt"))  # GCN+ZCA ran and cached its fit
    assert "Traceback" not in err


def _train_once(compose_cfg, npz, cache, run_dir, seed):
    cfg = compose_cfg(*base_overrides(npz, cache, "model=all_cnn_a", "data.preprocess=standardize",
                                      "trainer.max_epochs=1", "logger=none", f"seed={seed}", "data.augment=true"))
    metrics = training.train(cfg, run_dir)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return metrics, state


def test_seeds_make_cpu_runs_repeatable(compose_cfg, tiny_npz, shared_cache_dir, tmp_path):
    m1, s1 = _train_once(compose_cfg, tiny_npz, shared_cache_dir, tmp_path / "r1", seed=7)
    m2, s2 = _train_once(compose_cfg, tiny_npz, shared_cache_dir, tmp_path / "r2", seed=7)
    m3, s3 = _train_once(compose_cfg, tiny_npz, shared_cache_dir, tmp_path / "r3", seed=8)
    skip = {"wall_time_s"}
    assert {k: v for k, v in m1.items() if k not in skip} == {k: v for k, v in m2.items() if k not in skip}
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert any(not torch.equal(s1[k], s3[k]) for k in s1 if s1[k].is_floating_point())  # the seed matters


class Poison(L.Callback):
    """Replace one training batch by NaNs (epoch 1, step 2)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 2:
            batch[0].fill_(float("nan"))


def test_non_finite_loss_stops_and_last_good_checkpoint_stays(compose_cfg, tiny_npz, shared_cache_dir, tmp_path,
                                                                monkeypatch):
    real = C.build_callbacks
    monkeypatch.setattr(C, "build_callbacks", lambda cfg, run_dir: [Poison(), *real(cfg, run_dir)])
    cfg = compose_cfg(*base_overrides(tiny_npz, shared_cache_dir, "model=all_cnn_a", "data.preprocess=none",
                                      "trainer.max_epochs=3", "logger=none", "data.batch_size=8"))
    run_dir = tmp_path / "run"
    with pytest.raises(C.NonFiniteLossError) as e:
        training.train(cfg, run_dir)
    msg = str(e.value)
    assert "\n" not in msg
    assert "epoch 1" in msg and "step 2" in msg
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert str(ckpt) in msg or "last.ckpt" in msg
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["epoch"] == 0  # written after the good epoch, not after the bad one
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    net = training.build_module(cfg).net
    net.load_state_dict({k[len("net."):]: v for k, v in state["state_dict"].items() if k.startswith("net.")})
    assert torch.isfinite(net.eval()(torch.zeros(2, 3, 32, 32))).all()
    assert not (run_dir / "metrics.json").exists()  # only a finished fit writes it (the CLI records the failure)


def test_cli_huge_lr_stops_with_one_line(run_train, tmp_path, tiny_npz):
    run_dir = tmp_path / "run"
    rc, out, err = run_train(*base_overrides(tiny_npz, tmp_path / "zca", "model=model_a", "optim.lr=1e6",
                                             "trainer.max_epochs=3", "data.preprocess=none", "logger=none",
                                             f"hydra.run.dir={run_dir}"))
    line = last_line(err)
    assert rc == 1
    assert "Traceback" not in err, err[-3000:]
    assert line.startswith("error: ") and "non-finite loss" in line and "epoch" in line and "step" in line, line
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "diverged"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if "no checkpoint" not in line:  # it diverged after a good epoch: that checkpoint stays loadable
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert all(math.isfinite(float(v.abs().max())) for v in state["state_dict"].values()
                   if v.is_floating_point() and v.numel())


class StepSizes(L.Callback):
    """The norm of every optimizer step's weight change, with the epoch it was made in."""

    def __init__(self):
        self.steps: list[tuple[int, float]] = []

    def _flat(self, module):
        return torch.cat([p.detach().flatten() for p in module.net.parameters()])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = self._flat(pl_module).clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((trainer.current_epoch, (self._flat(pl_module) - self._before).norm().item()))


def test_update_cap_follows_the_learning_rate_past_a_milestone(compose_cfg, tiny_npz, shared_cache_dir, tmp_path):
    """lr_t * |g| <= max_update_norm at every step: after the milestone the cap is the same step size, not 10x less."""
    cap = 1e-2
    cfg = compose_cfg(*base_overrides(tiny_npz, shared_cache_dir, f"optim.max_update_norm={cap}", "optim.lr=10",
                                      "optim.milestones=[1]", "trainer.max_epochs=2", "optim.momentum=0",
                                      "optim.weight_decay=0", "model.dropout_input=0", "model.dropout_pool=0",
                                      "data.preprocess=none", "logger=csv", "callbacks.checkpoint.every_n_epochs=0",
                                      "callbacks.guided_backprop.every_n_epochs=0"))
    L.seed_everything(0)
    module = training.build_module(cfg)
    sizes = StepSizes()
    trainer = training.build_trainer(cfg, tmp_path, [sizes], training.build_logger(cfg, tmp_path))
    assert trainer.gradient_clip_val is None  # the cap is the module's, per step, not a fixed Trainer clip
    trainer.fit(module, datamodule=training.build_datamodule(cfg))
    trainer.logger.save()
    by_epoch = {e: [s for ep, s in sizes.steps if ep == e] for e in (0, 1)}
    assert by_epoch[0] and by_epoch[1]
    # lr 10 then 1: |g| is far above 1e-3 on this data, so every step is capped at exactly `cap` in both epochs.
    for e in (0, 1):
        assert all(s == pytest.approx(cap, rel=1e-3) for s in by_epoch[e]), (e, by_epoch[e])
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    clip = {int(r["epoch"]): float(r["optim/clip_norm"]) for r in rows if r.get("optim/clip_norm")}
    assert clip == {0: pytest.approx(cap / 10), 1: pytest.approx(cap / 1)}
    frac = [float(r["optim/clipped_frac"]) for r in rows if r.get("optim/clipped_frac")]
    grad = [float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")]
    assert frac == [1.0, 1.0] and len(grad) == 2 and all(g > cap for g in grad)


def test_update_cap_off_and_bad_values(compose_cfg, tiny_npz, shared_cache_dir, tmp_path):
    off = compose_cfg(*base_overrides(tiny_npz, shared_cache_dir, "optim.max_update_norm=null", "logger=none"))
    assert training.build_module(off).max_update_norm is None
    on = compose_cfg(*base_overrides(tiny_npz, shared_cache_dir, "logger=none"))
    assert training.build_module(on).max_update_norm == 0.125  # the default
    with pytest.raises(training.ConfigError, match="max_update_norm"):
        checks.check(compose_cfg(*base_overrides(tiny_npz, shared_cache_dir, "optim.max_update_norm=-1")))


def test_update_cap_bounds_the_first_sgd_step(compose_cfg, tiny_npz, shared_cache_dir, tmp_path):
    """With momentum and weight decay off, one step moves the weights by exactly min(lr * |g|, max_update_norm)."""
    def first_step(cap):
        cfg = compose_cfg(*base_overrides(tiny_npz, shared_cache_dir, f"optim.max_update_norm={cap}", "optim.lr=10",
                                          "optim.momentum=0", "optim.weight_decay=0", "model.dropout_input=0",
                                          "model.dropout_pool=0", "+trainer.max_steps=1", "logger=none",
                                          "callbacks.checkpoint.every_n_epochs=0",
                                          "callbacks.guided_backprop.every_n_epochs=0"))
        L.seed_everything(0)
        module = training.build_module(cfg)
        before = torch.cat([p.detach().flatten().clone() for p in module.net.parameters()])
        trainer = training.build_trainer(cfg, tmp_path / str(cap), [], False)
        trainer.fit(module, datamodule=training.build_datamodule(cfg))
        return (torch.cat([p.detach().flatten() for p in module.net.parameters()]) - before).norm().item()

    unclipped = first_step("null")
    assert unclipped > 10 * 1e-2  # lr * |g| exceeds the cap below, so the cap must act
    assert first_step(1e-2) == pytest.approx(1e-2, rel=1e-3)


def test_derived_settings_come_from_the_composed_config(compose_cfg, tiny_npz, shared_cache_dir):
    """A compiled network sees one batch shape (drop_last follows model.compile); no split, no validation loop."""
    plain = compose_cfg(*base_overrides(tiny_npz, shared_cache_dir))
    compiled = compose_cfg(*base_overrides(tiny_npz, shared_cache_dir, "model.compile=true"))
    assert training.build_datamodule(plain).drop_last is False
    assert training.build_datamodule(compiled).drop_last is True
    assert training.trainer_kwargs(plain)["limit_val_batches"] == 0
    split = compose_cfg(*base_overrides(tiny_npz, shared_cache_dir, "data.val_size=8"))
    assert "limit_val_batches" not in training.trainer_kwargs(split)
