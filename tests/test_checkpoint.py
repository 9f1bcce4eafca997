"""Trained runs load one way: from the path alone, and never by running code from the file."""

from __future__ import annotations

import os

import pytest
import torch

from allconv import checkpoint, training
from allconv.errors import CheckpointError
from allconv.module import AllConvModule
from conftest import SRC, last_line, run_cli, write_npz


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch tiny run: (run dir, its metrics)."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    root = tmp_path_factory.mktemp("ckpt")
    npz = write_npz(root / "tiny.npz", n_train=48, n_test=20)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", ["data=npz", f"data.path={npz}", f"data.cache_dir={root / 'zca'}", "model=all_cnn_a",
                                "model.width=0.125", "trainer.accelerator=cpu", "trainer.max_epochs=1",
                                "callbacks.progress_bar=none", "data.batch_size=16", "data.eval_batch_size=16",
                                "data.preprocess=standardize", "logger=none",
                                "callbacks.guided_backprop.every_n_epochs=0"])
    run_dir = root / "run"
    metrics = training.train(cfg, run_dir)
    return run_dir, metrics


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(path, marker):
    torch.save({"state_dict": {}, "hyper_parameters": {"net": {}}, "payload": RunsCode(marker)}, path)
    return path


def test_load_from_checkpoint_with_the_path_alone(trained):
    run_dir, _ = trained
    path = run_dir / "checkpoints" / "last.ckpt"
    module = AllConvModule.load_from_checkpoint(path, weights_only=True)
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert module.hparams.net["family"] == "a" and module.hparams.net["width"] == 0.125
    assert all(torch.equal(module.state_dict()[k], v) for k, v in saved.items())
    cfg, again = checkpoint.load(path)
    assert cfg.model.family == "a" and cfg.data.preprocess == "standardize"
    assert not again.training and all(torch.equal(again.state_dict()[k], v) for k, v in saved.items())


def test_a_crafted_checkpoint_runs_nothing_in_the_loader(tmp_path):
    marker = tmp_path / "pwned"
    path = crafted(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match="refused, nothing was run"):
        checkpoint.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["truncated", "foreign", "empty", "missing"])
def test_bad_checkpoints_are_one_line_errors(trained, tmp_path, case):
    run_dir, _ = trained
    good = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    path = tmp_path / f"{case}.ckpt"
    if case == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif case == "foreign":
        torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "epoch": 3}, path)
    elif case == "empty":
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.subprocess
def test_crafted_checkpoint_through_eval_and_resume_is_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = crafted(tmp_path / "evil.ckpt", marker)
    rc, _, err = run_cli(f"ckpt_path={evil}", cwd=tmp_path, script=SRC / "eval.py")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "refused, nothing was run" in last_line(err)
    # resume= of a run folder whose last.ckpt is the crafted file
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    crafted(run / "checkpoints" / "last.ckpt", marker)
    rc, _, err = run_cli(f"resume={run}", cwd=tmp_path)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "last.ckpt" in err and "start the run again" in err
    assert not marker.exists()
    assert not (tmp_path / "outputs").exists()  # nothing written: no eval folder, no run folder


def test_a_saved_width_that_does_not_fit_the_weights_is_refused_before_allocating(trained, tmp_path, monkeypatch):
    """The shapes are compared on the meta device first, and no network of the saved size is built (width 64
    would be 5 billion parameters; 2, 5 million, keeps a regression of this test affordable)."""
    run_dir, _ = trained
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["net"]["width"] = 2.0
    path = tmp_path / "wide.ckpt"
    torch.save(ckpt, path)
    from allconv import models

    built = []
    build = models.build

    def recording_build(*args, **kwargs):
        net = build(*args, **kwargs)
        built.append(next(net.parameters()).device.type)
        return net

    monkeypatch.setattr(models, "build", recording_build)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    assert str(e.value).startswith(f"checkpoint {str(path)!r} does not match its own model (hyper_parameters.net "
                                   f"builds ") and "the file holds" in str(e.value)
    assert built == ["meta"]  # nothing of that size was allocated
