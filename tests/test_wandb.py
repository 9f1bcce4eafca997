"""logger=wandb for real, offline: a 2-job multirun gives two W&B runs whose run files hold the resolved
config, the metrics (lr, epoch time, errors), the guided-backprop grid, the filters, the learning curve
and the final summary. The W&B sweep: wandb's own agent code builds the command of each of the 48 grid
cells, each composes and checks, and one trains end to end with W&B offline."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import struct
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import yaml

from allconv import checks
from allconv.report import runs
from conftest import CONF, run_cli, write_npz

BLOCK = 32768  # the .wandb file: a leveldb-style log of protobuf Records in 32 KiB blocks


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # block padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk of a record
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def logged(run_dir: Path) -> dict:
    """What a W&B run file holds: run name/group, config keys, history rows, summary."""
    out = {"config": set(), "history": [], "summary": {}}
    for r in read_records(next(run_dir.glob("run-*.wandb"))):
        kind = r.WhichOneof("record_type")
        if kind == "run":  # wandb.init's config comes with the run record; later updates as config records
            out["name"], out["group"], out["id"] = r.run.display_name, r.run.run_group, r.run.run_id
            out["config"] |= {i.key for i in r.run.config.update}
        elif kind == "config":
            out["config"] |= {i.key for i in r.config.update}
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({i.key: json.loads(i.value_json) for i in r.summary.update if i.key})
    return out


@pytest.mark.system
@pytest.mark.subprocess
def test_offline_wandb_run_per_multirun_job(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    data = write_npz(tmp_path / "data.npz", n_train=96, n_test=32)
    sweep = tmp_path / "sweep"
    env = {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wbc"),
           "WANDB_CACHE_DIR": str(tmp_path / "wbcache"), "WANDB_DATA_DIR": str(tmp_path / "wbdata")}
    rc, out, err = run_cli("-m", "data=npz", f"data.path={data}", "data.preprocess=standardize",
                           "model.width=0.125", "trainer.max_epochs=1", "data.batch_size=32", "data.val_size=32",
                           "logger=wandb", "callbacks.progress_bar=none", "trainer.enable_progress_bar=false",
                           "print_config=false", "callbacks.checkpoint.every_n_epochs=0", "seed=0,1",
                           f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=env)
    assert rc == 0, err[-3000:]
    offline_lines = [ln for ln in err.splitlines() if ln.startswith("wandb: no API key")]
    assert len(offline_lines) == 2 and "logging offline" in offline_lines[0]

    ids = set()
    for seed in (0, 1):
        job = sweep / f"{seed}_all_cnn_c_lr0.05_s{seed}"
        metrics = json.loads((job / "metrics.json").read_text())
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs  # each job its own W&B run, in its own folder
        got = logged(runs[0])
        ids.add(got["id"])
        assert got["name"] == f"all_cnn_c_lr0.05_s{seed}" and got["group"] == "all_cnn_c_lr0.05"
        assert {"model", "data", "optim", "trainer", "seed"} <= got["config"]
        rows = {k: v for row in got["history"] for k, v in row.items()}
        assert abs(rows["lr"] - 0.05) < 1e-6 and rows["epoch_time_s"] > 0
        assert {"train/loss", "val/error", "test/error"} <= set(rows)
        assert rows["test/error"] == metrics["test_error"]
        assert rows["guided_backprop/_type"] == "images/separated"  # the guided-backprop grid, as an image
        for key in ("filters/block1.conv1", "filters/block1.conv2", "learning_curve"):  # and the other figures
            assert rows[f"{key}/_type"] == "images/separated", sorted(rows)
        assert (job / "csv" / "metrics.csv").is_file() and (job / "learning_curve.png").is_file()
        assert got["summary"]["final/test_error"] == metrics["test_error"] and got["summary"]["final/seed"] == seed
    assert len(ids) == 2


# -- W&B sweep agents ---------------------------------------------------------------------------------
def grid_cells(spec: dict) -> list[dict]:
    """The runs of a grid sweep: every combination of the `values` parameters, with the `value` ones."""
    params = spec["parameters"]
    axes = [[(k, v) for v in p["values"]] if "values" in p else [(k, p["value"])] for k, p in params.items()]
    return [dict(cell) for cell in itertools.product(*axes)]


def agent_command(spec: dict, cell: dict, monkeypatch, tmp_path: Path, program: str | None = None):
    """(argv, env) that `wandb agent` starts for one run: wandb's own Agent._command_run, the process mocked."""
    from wandb import wandb_agent

    started = []

    class Started:
        def __init__(self, command=None, env=None, **_):
            started.append((command, env))

    monkeypatch.setattr(wandb_agent, "AgentProcess", Started)
    for var in ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_SWEEP_ID"):
        monkeypatch.setenv(var, str(tmp_path) if var == "WANDB_DIR" else "")  # restored after the test
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep0")
    agent = wandb_agent.Agent(api=mock.MagicMock(), queue=mock.MagicMock(), sweep_id="sweep0")
    agent._sweep_command = list(spec["command"])  # what the agent reads from the sweep's config
    agent._command_run({"type": "run", "run_id": f"run{len(started)}", "program": program or spec["program"],
                        "args": {k: {"value": v} for k, v in cell.items()}})
    return started[-1]


def test_agent_commands_of_all_48_cells_compose(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig


    spec = yaml.safe_load((CONF / "sweep" / "paper_grid.yaml").read_text())
    assert spec["method"] == "grid" and spec["program"] == "src/train.py"
    cells = grid_cells(spec)
    assert len(cells) == 48
    assert {c["model"] for c in cells} == set(runs.REFERENCE) and {c["optim.lr"] for c in cells} == {0.25, 0.1, 0.05,
                                                                                                       0.01}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for cell in cells:
            argv, env = agent_command(spec, cell, monkeypatch, tmp_path)
            assert argv[:3] == ["/usr/bin/env", "python", "src/train.py"]  # `python` from PATH: activate the venv
            assert f"model={cell['model']}" in argv and f"optim.lr={cell['optim.lr']}" in argv
            cfg = compose(config_name="train", overrides=argv[3:], return_hydra_config=True)
            assert cfg.hydra.runtime.choices.model == cell["model"] and cfg.optim.lr == cell["optim.lr"]
            assert cfg.logger.kind == "wandb" and cfg.callbacks.progress_bar == "none"
            HydraConfig.instance().set_config(cfg)  # what hydra.main does: the run folder's name resolves
            folder = rf"multirun/wandb-sweep/[\d_-]+_{cell['model']}_lr{cell['optim.lr']}"
            assert re.fullmatch(folder, cfg.hydra.run.dir), cfg.hydra.run.dir
            HydraConfig.instance().cfg = None
            del cfg.hydra
            checks.check_config(cfg)  # the values of every run are valid, not only composable
            assert env["WANDB_SWEEP_ID"] == "sweep0" and env["WANDB_RUN_ID"].startswith("run")


@pytest.mark.system
@pytest.mark.subprocess
def test_an_agent_command_trains_with_wandb_offline(monkeypatch, tmp_path):
    from conftest import PYTHON, TRAIN_PY

    spec = yaml.safe_load((CONF / "sweep" / "paper_grid.yaml").read_text())
    cell = next(c for c in grid_cells(spec) if c["model"] == "all_cnn_c" and c["optim.lr"] == 0.05)
    # The program's absolute path lets the run folder (relative, multirun/wandb-sweep/) land in tmp_path.
    argv, env = agent_command(spec, cell, monkeypatch, tmp_path, program=str(TRAIN_PY))
    data = write_npz(tmp_path / "data.npz", n_train=64, n_test=16)
    tiny = ["data=npz", f"data.path={data}", "data.preprocess=standardize", "model.width=0.125",
            "trainer.max_epochs=1", "data.batch_size=32", "trainer.enable_progress_bar=false", "print_config=false",
            "callbacks.checkpoint.every_n_epochs=0"]
    env = {**env, "WANDB_MODE": "offline", "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wbc"),
           "WANDB_CACHE_DIR": str(tmp_path / "wbcache"), "WANDB_DATA_DIR": str(tmp_path / "wbdata"),
           "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}"}  # the activated environment
    proc = subprocess.run([*argv, *tiny], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "multirun" / "wandb-sweep").glob("*_all_cnn_c_lr0.05")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["model"] == "all_cnn_c" and metrics["lr"] == 0.05
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    got = logged(offline)
    assert got["id"] == env["WANDB_RUN_ID"]  # the run the sweep controller handed to the agent
    assert got["summary"]["final/test_error"] == metrics["test_error"]


# -- one W&B run per run ------------------------------------------------------------------------------
def history_steps(offline: Path) -> list[int]:
    return [int(i.value_json) for r in read_records(next(offline.glob("run-*.wandb")))
            if r.WhichOneof("record_type") == "history" for i in r.history.item
            if (i.key or "/".join(i.nested_key)) == "_step"]


@pytest.mark.subprocess
def test_a_continued_run_is_one_wandb_run_with_one_history_and_tags(tmp_path):
    """logger=many (csv, W&B offline, TensorBoard), tags=[paper,cpu]; the run is continued with resume= (its
    metrics.json removed: as if killed after the checkpoint of epoch 1). Both launches write to one W&B run id, the
    one kept in the folder; wandb's own `wandb sync --dry-run` lists the two files of that one id; W&B's steps go
    on from the checkpoint's; the pictures never reach csv/metrics.csv; the tags reach metrics.json, identity.json,
    W&B and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import PYTHON

    data = write_npz(tmp_path / "data.npz", n_train=64, n_test=16)
    run = tmp_path / "run"
    env = {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wbc"), "WANDB_API_KEY": "",
           "WANDB_CACHE_DIR": str(tmp_path / "wbcache"), "WANDB_DATA_DIR": str(tmp_path / "wbdata"),
           "WANDB_MODE": "offline"}
    rc, out, err = run_cli("data=npz", f"data.path={data}", "data.preprocess=standardize", "model.width=0.125",
                           "trainer.max_epochs=1", "data.batch_size=32", "logger=many", "tags=[paper,cpu]",
                           "callbacks.progress_bar=none", "print_config=false", f"hydra.run.dir={run}", cwd=tmp_path,
                           env=env)
    assert rc == 0, err[-3000:]
    (run / "metrics.json").unlink()
    rc, out, err = run_cli(f"resume={run}", "trainer.max_epochs=2", cwd=tmp_path, env=env)
    assert rc == 0, err[-3000:]
    assert "malformed" not in err and "warning" not in err.lower(), err[-2000:]

    kept = (run / "wandb_run_id.txt").read_text().strip()
    first, second = sorted((run / "wandb").glob("offline-run-*"))
    assert first.name.endswith(f"-{kept}") and second.name.endswith(f"-{kept}")
    assert logged(first)["id"] == logged(second)["id"] == kept
    proc = subprocess.run([str(Path(PYTHON).parent / "wandb"), "sync", "--dry-run", str(first), str(second)],
                          cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    listed = re.findall(r"offline-run-\d+_\d+-(\w+)/run-(\w+)\.wandb", proc.stdout + proc.stderr)
    assert listed and {i for pair in listed for i in pair} == {kept}, proc.stdout + proc.stderr
    steps_1, steps_2 = history_steps(first), history_steps(second)
    assert steps_1 == sorted(steps_1) and steps_2 == sorted(steps_2)
    assert min(steps_2) > max(steps_1) == 2  # epoch 1 ended at global step 2 (2 batches); the continuation goes on
    assert set(logged(first)["config"]) >= {"tags"} and "learning_curve/_type" in {
        k for row in logged(second)["history"] for k in row}

    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    assert rows and all(k in ("epoch", "step") or "/" in k or k in ("lr", "epoch_time_s") for k in rows[0])
    assert not any("Image" in (v or "") for row in rows for v in row.values())
    assert [int(r["epoch"]) for r in rows if r.get("train/loss")] == [0, 1]

    metrics = json.loads((run / "metrics.json").read_text())
    identity = json.loads((run / "identity.json").read_text())
    assert metrics["tags"] == ["paper", "cpu"] and identity["settings"]["tags"] == ["paper", "cpu"]
    run_record = next(r for r in read_records(next(first.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "run")
    assert {"paper", "cpu"} <= set(run_record.run.tags)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "tags/text_summary" in events.Tags()["tensors"]
    assert b"paper, cpu" in events.Tensors("tags/text_summary")[0].tensor_proto.string_val[0]


def test_a_crafted_wandb_id_file_is_refused_in_one_line(tmp_path, monkeypatch):
    from allconv.errors import RunFolderError
    from allconv.run_folder import RunFolder
    from allconv.wandb_logger import run_id

    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    folder = RunFolder(tmp_path)
    new = run_id(folder)
    assert folder.wandb_id.read_text().strip() == new and run_id(folder) == new  # kept, then read back
    for bad in ("../../x", "a b", "x" * 65, ""):
        folder.wandb_id.write_text(bad + "\n")
        with pytest.raises(RunFolderError, match="not a W&B run id"):
            run_id(folder)
    folder.wandb_id.unlink()
    folder.wandb_id.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RunFolderError):
        run_id(folder)
