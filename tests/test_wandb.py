"""logger=wandb for real, offline: a 2-job multirun gives two W&B runs whose run files hold the resolved
config, the metrics (lr, epoch time, errors), the guided-backprop grid and the final summary; and the
W&B sweep spec turns into a command line that train.py accepts."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import yaml

from allconv import cli, report
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
        if kind == "run":
            out["name"], out["group"], out["id"] = r.run.display_name, r.run.run_group, r.run.run_id
        elif kind == "config":
            out["config"] |= {i.key for i in r.config.update}
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({i.key: json.loads(i.value_json) for i in r.summary.update if i.key})
    return out


def test_offline_wandb_run_per_multirun_job(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    data = write_npz(tmp_path / "data.npz", n_train=96, n_test=32)
    sweep = tmp_path / "sweep"
    env = {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wbc"),
           "WANDB_CACHE_DIR": str(tmp_path / "wbcache"), "WANDB_DATA_DIR": str(tmp_path / "wbdata")}
    rc, out, err = run_cli("-m", "data=npz", f"data.path={data}", f"data.cache_dir={tmp_path / 'zca'}",
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
        assert got["summary"]["final/test_error"] == metrics["test_error"] and got["summary"]["final/seed"] == seed
    assert len(ids) == 2


def test_wandb_sweep_spec_is_the_paper_grid_and_its_command_composes():
    spec = yaml.safe_load((CONF / "sweep" / "paper_grid.yaml").read_text())
    assert spec["method"] == "grid" and spec["program"] == "src/train.py"
    assert spec["command"][:4] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
    params = spec["parameters"]
    assert params["model"]["values"] == list(report.REFERENCE)
    assert params["optim.lr"]["values"] == [0.25, 0.1, 0.05, 0.01]
    # What `wandb agent` runs for one grid cell (${args_no_hyphens} -> key=value pairs).
    args = [f"{k}={v['values'][0] if 'values' in v else v['value']}" for k, v in params.items()]
    cli.preflight("train", ["train.py", *args, *spec["command"][4:]])  # exits 2 if anything does not compose
