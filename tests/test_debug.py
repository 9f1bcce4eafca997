"""debug=default|fdr|limit|overfit|profiler: each composes with any model and data, passes the schema, is listed
by --help, keeps its run folder under outputs/debug/ (multirun/debug/ for a sweep), and does what it says on the
CPU: one batch, a fraction of the batches for a few epochs, the loss of a few batches driven toward 0, the
profiler's table in the run folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from allconv import callbacks as C
from allconv import checks, schema, training
from allconv.errors import ConfigError
from conftest import CONF, write_npz

PRESETS = sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))
QUIET = ["callbacks.progress_bar=none", "trainer.enable_progress_bar=false", "print_config=false",
         "callbacks.guided_backprop.every_n_epochs=0", "trainer.enable_model_summary=false"]


def tiny(npz: Path, *extra: str) -> list[str]:
    return ["data=npz", f"data.path={npz}", "data.preprocess=standardize", "model.width=0.125", *extra]


def composed(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)


def train_rows(run_dir: Path) -> list[dict]:
    """csv/metrics.csv's rows that hold an epoch's training loss."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("train/loss")]


class Batches(L.Callback):
    """The training batches Lightning ran (epoch, images) and the test batches' indices, its limits applied."""

    def __init__(self):
        self.train, self.test, self.epochs = [], [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append((trainer.current_epoch, batch[0].clone()))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.test.append(batch_idx)

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs += 1


@pytest.fixture
def batches(monkeypatch):
    seen = Batches()
    real = C.build_callbacks
    monkeypatch.setattr(C, "build_callbacks", lambda cfg, run_dir: [seen, *real(cfg, run_dir)])
    return seen


@pytest.fixture
def one_thread():
    """A network this small trains fastest on one thread, and the suite's two workers then do not fight over the
    two cores: on busy cores the default two threads made these steps ~20x slower than one (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_five_presets_exist_compose_with_any_model_and_data_and_validate():
    assert PRESETS == ["default", "fdr", "limit", "overfit", "profiler"]
    for preset in PRESETS:
        for choice in (["model=model_a", "data=cifar100"], ["model=strided_cnn_b", "trainer=ddp", "logger=wandb"],
                       ["experiment=quick_cpu"]):
            cfg = composed(f"debug={preset}", *choice, hydra=True)
            HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.choices.model} in the folder names resolves
            run_dir, sweep_dir = cfg.hydra.run.dir, cfg.hydra.sweep.dir
            assert run_dir.startswith("outputs/debug/") and sweep_dir.startswith("multirun/debug/"), (preset, choice)
            assert run_dir.endswith("_" + cfg.hydra.runtime.choices.model)
            HydraConfig.instance().cfg = None
            del cfg.hydra
            schema.validate(cfg, schema.TrainConfig)
            t = cfg.trainer
            assert (t.accelerator, t.devices, t.strategy) == ("cpu", 1, "auto"), (preset, t)
            assert t.detect_anomaly is (preset != "overfit")  # overfit: hundreds of steps, each ~10x slower with it
            # no W&B unless the command line asks for it: a command-line group choice beats the preset's
            assert cfg.logger.kind == ("wandb" if "logger=wandb" in choice else "csv")
    assert composed("debug=fdr").trainer.fast_dev_run is True
    assert composed("debug=overfit").trainer.overfit_batches == 3
    assert composed("debug=profiler").trainer.profiler == "simple"
    plain = composed()
    assert plain.trainer.profiler is None and "detect_anomaly" not in plain.trainer  # real runs: untouched


def test_help_lists_the_presets_and_the_loggers(run_entry):
    rc, out, err = run_entry("--help")
    assert rc == 0, err
    groups = out.split("== Config groups")[1].split("== The composed config")[0]
    assert "debug: default, fdr, limit, overfit, profiler" in groups
    assert "logger: csv, many, none, tensorboard, wandb" in groups


def test_debug_fdr_runs_one_batch_and_leaves_no_record(run_entry, tmp_path):
    """A check, not a run: no identity.json, metrics.json, checkpoint or logger file (Lightning 2.6 would save
    last.ckpt at the end of a fast_dev_run fit), so no report lists it and its folder is new to a relaunch."""
    from allconv.errors import ReportError
    from allconv.report.pages import runs_or_error
    from allconv.run_folder import RunFolder

    npz = write_npz(tmp_path / "data.npz", n_train=48, n_test=16)
    rc, out, err = run_entry("debug=fdr", *tiny(npz, "data.batch_size=16", "data.eval_batch_size=8"), cwd=tmp_path)
    assert rc == 0, err[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "debug").glob("*/*_all_cnn_c")  # not outputs/<date>/, where real runs go
    assert "fast_dev_run: 1 training step(s) and the test ran; test error" in err and "nothing is recorded" in err
    assert "config" in out and "Total params" in out  # the config tree and the model summary are printed
    assert sorted(p.name for p in run_dir.iterdir()) == []  # nothing: no record, checkpoint, csv or picture
    assert RunFolder(run_dir).state() == "new"
    with pytest.raises(ReportError, match="no runs under"):
        runs_or_error([run_dir])
    rc, out, err = run_entry("debug=fdr", *tiny(npz, "data.batch_size=16", "data.eval_batch_size=8"),
                             f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert rc == 0, err[-3000:]  # the same folder again: nothing to overwrite, nothing refused


def test_debug_limit_trains_a_fraction_of_the_batches_for_three_epochs(tmp_path, shared_cache_dir, batches,
                                                                        one_thread):
    npz = write_npz(tmp_path / "data.npz", n_train=320, n_test=40)
    cfg = composed("debug=limit", *tiny(npz, "data.batch_size=8", "data.eval_batch_size=4", *QUIET))
    metrics = training.train(cfg, tmp_path / "run")
    per_epoch = [sum(1 for e, _ in batches.train if e == epoch) for epoch in range(3)]
    assert per_epoch == [2, 2, 2] and batches.epochs == 3  # 5% of 40 batches, 3 epochs
    assert batches.test == [0]  # 10% of 10 test batches
    assert [int(r["epoch"]) for r in train_rows(tmp_path / "run")] == [0, 1, 2]
    assert metrics["epochs"] == 3


def test_debug_limit_on_a_small_file_is_refused_before_training_naming_the_batches(run_entry, tmp_path):
    """1,024 images at batch 128 are 8 batches: 5% of them is 0.4, no batch. Lightning would raise after building
    the Trainer (a traceback; for the test loop, after the whole training); the pre-flight refuses it in one line,
    nothing written. A fraction that keeps one batch, or a whole number, trains."""
    npz = write_npz(tmp_path / "data.npz", n_train=1024, n_test=16)
    for extra, value in (("debug=limit", "0.05"), ("trainer.limit_train_batches=0.01", "0.01")):
        rc, out, err = run_entry(extra, *tiny(npz), "hydra.run.dir=run", cwd=tmp_path)
        assert rc == 2 and err.count("\n") == 1, err[-2000:]
        assert err.startswith(f"error: trainer.limit_train_batches={value} is ") and "of the 8 train batches " \
            "(1,024 images at data.batch_size=128): no batch would run; give at least 0.125" in err, err
        assert not (tmp_path / "run").exists()
    cfg = composed("debug=limit", *tiny(npz, "trainer.limit_train_batches=0.125", "data.eval_batch_size=1"))
    checks.check_batch_limits(cfg)  # one batch of 8: runs
    cfg = composed(*tiny(npz, "data.eval_batch_size=4", "trainer.limit_test_batches=0.2"))
    with pytest.raises(ConfigError, match=r"limit_test_batches=0.2 is 0.8 of the 4 test batches"):
        checks.check_batch_limits(cfg)


@pytest.mark.parametrize("limit, said", [("trainer.max_steps=3", "trainer.max_steps=3"),
                                         ("trainer.max_time=00:00:00:00", "trainer.max_time=00:00:00:00")])
def test_a_run_stopped_by_a_limit_says_so(tmp_path, shared_cache_dir, capsys, one_thread, limit, said):
    """metrics.json and a line say what stopped the run and after how many of its epochs; the report marks it."""
    from allconv.report.runs import read_run
    from allconv.report.table import report

    npz = write_npz(tmp_path / "data.npz", n_train=64, n_test=16)
    cfg = composed(*tiny(npz, "data.batch_size=32", "trainer.max_epochs=3", "+" + limit, *QUIET[:-1]))
    metrics = training.train(cfg, tmp_path / "run")
    epochs = 1 if "max_steps" in limit else 0  # 3 steps: one epoch of 2, then one step; no time: the first step
    assert metrics["stopped_by"] == said and metrics["epochs_completed"] == epochs and metrics["max_epochs"] == 3
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stopped_by"] == said
    assert f"stopped by {said} after {epochs} of 3 epochs" in capsys.readouterr().err
    assert read_run(tmp_path / "run").stopped == f"stopped by {said} after {epochs} of 3 epochs"
    text, _ = report([tmp_path / "run"], tmp_path / "out", plot=False)
    assert "## Runs stopped by a limit" in text and f"run: stopped by {said} after {epochs} of 3 epochs" in text


def test_a_run_that_ran_its_epochs_says_nothing_of_a_stop(tmp_path, shared_cache_dir, one_thread):
    npz = write_npz(tmp_path / "data.npz", n_train=64, n_test=16)
    metrics = training.train(composed(*tiny(npz, "data.batch_size=32", "trainer.max_epochs=1", *QUIET[:-1])),
                             tmp_path / "run")
    assert "stopped_by" not in metrics and metrics["epochs"] == 1


def test_debug_overfit_drives_the_loss_of_three_batches_toward_zero(tmp_path, shared_cache_dir, batches, one_thread):
    """Random labels: only memorising the same three batches lowers the loss, so a loader that reshuffled each
    epoch (new batches every time) would leave it high. The preset as it is (200 epochs), on 3 batches of 4."""
    npz = write_npz(tmp_path / "data.npz", n_train=40, n_test=16)
    cfg = composed("debug=overfit", *tiny(npz, "data.batch_size=4", "data.eval_batch_size=16", *QUIET))
    training.train(cfg, tmp_path / "run")
    first = [x for e, x in batches.train if e == 0]
    last = [x for e, x in batches.train if e == batches.epochs - 1]
    assert len(first) == len(last) == 3 and all((a == b).all() for a, b in zip(first, last, strict=True))
    losses = [float(r["train/loss"]) for r in train_rows(tmp_path / "run")]
    assert len(losses) == cfg.trainer.max_epochs
    assert losses[-1] < 0.1 * losses[0], losses


def test_debug_profiler_writes_its_table_into_the_run_folder(tmp_path, shared_cache_dir, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # a file written relative to the working folder would show up below
    npz = write_npz(tmp_path / "data.npz", n_train=32, n_test=16)
    cfg = composed("debug=profiler", *tiny(npz, "data.batch_size=16", "data.eval_batch_size=16", *QUIET))
    run_dir = tmp_path / "run"
    training.train(cfg, run_dir)
    fit = (run_dir / "fit-profiler.txt").read_text()
    assert fit.startswith("FIT Profiler Report") and "run_training_epoch" in fit and "training_step" in fit
    assert "TEST Profiler Report" in (run_dir / "test-profiler.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "run"]  # nothing outside the run folder
