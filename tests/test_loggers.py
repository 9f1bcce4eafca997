"""logger=tensorboard and logger=many: TensorBoard's own reader (EventAccumulator) returns the scalars of the run's
csv/metrics.csv, step for step; a resumed run continues the same TensorBoard run; W&B, offline, gets the same
metrics too; a bad list of loggers is one line."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from allconv import training
from conftest import CONF, only_line, run_cli, write_npz

QUIET = ["callbacks.progress_bar=none", "trainer.enable_progress_bar=false", "print_config=false",
         "callbacks.guided_backprop.every_n_epochs=0", "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return write_npz(tmp_path_factory.mktemp("data") / "tiny.npz", n_train=48, n_test=16)


def overrides(npz: Path, *extra: str) -> list[str]:
    return ["data=npz", f"data.path={npz}", "data.preprocess=standardize", "model.width=0.125", "data.batch_size=16",
            "data.eval_batch_size=16", "data.val_size=16", *QUIET, *extra]


def composed(*args: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(args))


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard run folder, as TensorBoard itself reads it (purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    reader.Reload()
    return {tag: sorted((e.step, e.value) for e in reader.Scalars(tag)) for tag in reader.Tags()["scalars"]}


def csv_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """csv/metrics.csv by column: (step, value) for every row that holds the column."""
    out: dict[str, list] = {}
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    out.setdefault(key, []).append((int(row["step"]), float(value)))
    return {k: sorted(v) for k, v in out.items()}


def assert_same(tensorboard: dict, table: dict) -> None:
    assert sorted(tensorboard) == sorted(table)
    for key, rows in table.items():
        got = tensorboard[key]
        assert [s for s, _ in got] == [s for s, _ in rows], key
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for (_, a), (_, b) in zip(got, rows, strict=True)), \
            (key, got, rows)  # TensorBoard keeps float32: the CSV's values are float32 ones written in full


def test_tensorboard_event_file_holds_the_scalars_of_the_csv_log(npz, tmp_path):
    run_dir = tmp_path / "run"
    training.train(composed(*overrides(npz, "logger=tensorboard", "trainer.max_epochs=2")), run_dir)
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(("tensorboard", "lightning_logs"))] == \
        ["tensorboard"]
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    table = csv_scalars(run_dir)
    assert {"train/loss", "train/acc", "val/error", "test/error", "lr", "epoch"} <= set(table)
    assert len(table["train/loss"]) == 2 and len(table["test/error"]) == 1
    assert_same(scalars, table)


def test_many_loggers_each_get_the_same_metrics(npz, tmp_path, monkeypatch):
    """csv, W&B (disabled here: no W&B process; the offline run is the system test below) and TensorBoard."""
    run_dir = tmp_path / "run"
    cfg = composed(*overrides(npz, "logger=many", "logger.mode=disabled", "trainer.max_epochs=1"))
    loggers = training.build_logger(cfg, run_dir)
    assert [type(lg).__name__ for lg in loggers] == ["RunLogger", "RunTensorBoardLogger"]  # W&B first: it is closed
    assert [type(lg).__name__ for lg in training.build_logger(
        composed(*overrides(npz, "logger=many", "logger.loggers=[tensorboard,csv]")), run_dir)] == \
        ["CSVLogger", "RunTensorBoardLogger"]
    training.train(cfg, run_dir)
    assert_same(tensorboard_scalars(run_dir / "tensorboard"), csv_scalars(run_dir))


def test_resumed_run_continues_the_same_tensorboard_run(npz, tmp_path):
    """Killed after its checkpoint of epoch 1, having logged epoch 2: the resume trains epoch 2 again, in the same
    tensorboard/ folder (no version_1), and TensorBoard hides the earlier launch's epoch 2 as the CSV drops it."""
    run_dir = tmp_path / "run"
    args = overrides(npz, "logger=many", "logger.mode=disabled", "trainer.max_epochs=3",
                     "callbacks.checkpoint.every_n_epochs=2")
    training.train(composed(*args), run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    (run_dir / "metrics.json").unlink()
    first = tensorboard_scalars(run_dir / "tensorboard")
    first_files = set((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert [s for s, _ in first["train/loss"]] == [1, 3, 5]  # 2 batches an epoch: logged at its last step

    training.train(composed(*args, f"ckpt_path={ckpt}"), run_dir)
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir() if p.is_dir()) == []  # no version_N
    assert set((run_dir / "tensorboard").glob("events.out.tfevents.*")) > first_files  # added beside the first's
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1, 3, 5] and len(scalars["test/error"]) == 1  # once each
    assert scalars["train/loss"][:2] == first["train/loss"][:2]  # epochs 0 and 1 are the first launch's
    assert_same(scalars, csv_scalars(run_dir))


def test_a_list_with_an_unknown_logger_is_one_line(run_entry, npz, tmp_path):
    rc, out, err = run_entry(*overrides(npz, "logger=many", "logger.loggers=[csv,foo]"), "hydra.run.dir=run")
    assert rc == 2
    assert only_line(err) == "error: logger.loggers=[csv, foo]: must be a list of csv, wandb, tensorboard " \
                             "(csv among them)"
    rc, out, err = run_entry(*overrides(npz, "logger=many", "logger.loggers=[wandb,tensorboard]"), "hydra.run.dir=run")
    assert rc == 2
    assert only_line(err) == "error: logger.loggers=[wandb, tensorboard]: must include csv: the learning curve and " \
                             "the report read csv/metrics.csv"
    assert not (tmp_path / "run").exists()


@pytest.mark.system
@pytest.mark.subprocess
def test_many_loggers_with_wandb_offline_from_the_command_line(npz, tmp_path, monkeypatch):
    """The whole command: W&B offline without an API key, and W&B, TensorBoard and the CSV log hold the same
    scalars at the same steps."""
    from test_wandb import logged

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    env = {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wbc"),
           "WANDB_CACHE_DIR": str(tmp_path / "wbcache"), "WANDB_DATA_DIR": str(tmp_path / "wbdata")}
    run_dir = tmp_path / "run"
    rc, out, err = run_cli(*overrides(npz, "logger=many", "trainer.max_epochs=2"), f"hydra.run.dir={run_dir}",
                           cwd=tmp_path, env=env)
    assert rc == 0, err[-3000:]
    assert any(line.startswith("wandb: no API key") for line in err.splitlines())
    table = csv_scalars(run_dir)
    assert_same(tensorboard_scalars(run_dir / "tensorboard"), table)
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    history = [row for row in logged(offline)["history"] if "trainer/global_step" in row]
    wandb: dict[str, list] = {}
    for row in history:  # one row per step (W&B's step is the trainer's): its scalars, not its pictures' fields
        pictures = {k[:-len("/_type")] for k in row if k.endswith("/_type")}
        for key, value in row.items():
            if not key.startswith(("_", "trainer/")) and key.rsplit("/", 1)[0] not in pictures:
                wandb.setdefault(key, []).append((row["trainer/global_step"], value))
    # W&B merges what one step logs into one row: `epoch`, logged with the training and the validation metrics
    # of a step, is there once (the same value)
    assert_same({k: sorted(v) for k, v in wandb.items()}, {k: sorted(set(v)) for k, v in table.items()})
