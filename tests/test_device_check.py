"""scripts/device_check.sh --dry-run: the GPU check's whole path (decode, bench, train, table) on the CPU.

A tiny JPEG file in the shared format stands in for CIFAR-10; a planted `wandb` package records any
import of it. Nothing here is timed: only what the check prints and writes is checked.
"""

from __future__ import annotations

import io
import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import PYTHON, REPO, random_images


def write_jpeg_npz(path, n_train=96, n_test=40, seed=0):
    """The layout of shared/data/cifar10-jpeg.npz: concatenated JPEG bytes, offsets, labels per split."""
    rng = np.random.default_rng(seed)
    arrays = {"classes": np.array([f"class{i}" for i in range(10)])}
    for split, n in (("train", n_train), ("test", n_test)):
        blobs = []
        for img in random_images(n, seed):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"{split}_labels"] = rng.integers(0, 10, n).astype(np.int64)
    np.savez(path, **arrays)
    return path


@pytest.mark.subprocess
def test_dry_run_prints_table_and_writes_results(tmp_path):
    jpeg = write_jpeg_npz(tmp_path / "cifar10-jpeg.npz")
    spy = tmp_path / "spy" / "wandb"
    spy.mkdir(parents=True)
    (spy / "__init__.py").write_text(f"open({str(tmp_path / 'wandb_imported')!r}, 'w').close()\n"
                                     "raise ImportError('wandb must not be imported by the device check')\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": PYTHON, "PYTHONPATH": str(tmp_path / "spy"),
           "ALLCONV_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", "scripts/device_check.sh", "--dry-run", "--jpeg", str(jpeg),
                           "--work", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "wandb_imported").exists()

    # The short table comes last: header, separator, one row with the card and the test error.
    lines = proc.stdout.strip().splitlines()
    assert lines[-3].startswith("| card | precision |") and "test error" in lines[-3]
    assert lines[-2].startswith("|---")
    assert lines[-1].startswith("| CPU") and "shortened: 2 of 350 epochs" in lines[-1]
    assert "DRY RUN" in proc.stdout

    s = json.loads((out / "summary.json").read_text())
    assert s["dry_run"] and s["epochs"] == 2 and s["milestones"] == [1, 1, 2]
    assert (s["n_train"], s["n_test"]) == (96, 40)
    assert 0.0 <= s["test_error"] <= 1.0
    assert s["img_s"] > 0 and s["ratio"] > 0 and s["pct_peak"] > 0
    assert (out / "summary.md").read_text() == "\n".join(lines[-3:]) + "\n"

    bench = json.loads((out / "bench.json").read_text())
    assert [r["config"] for r in bench["rows"]] == ["model_a", "all_cnn_c"]
    for r in bench["rows"]:
        assert len(r["lightning_s"]) == len(r["plain_s"]) == 2  # --repeats 2, interleaved
        assert r["macs_per_image"] > 0 and r["tflops"] > 0
    assert "| Lightning/plain, wall" in (out / "bench.md").read_text()
    assert json.loads((out / "train_metrics.json").read_text())["epochs"] == 2
    assert (out / "train_metrics.csv").is_file()
    # The device tool brings back at most 8 files from $OUT.
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8


def test_schedule_scales_milestones():
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_check", REPO / "scripts" / "device_check.py")
    dc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dc)
    assert dc.schedule(0.5, 400.0) == (350, [200, 250, 300], "paper recipe, 350 epochs")
    epochs, ms, label = dc.schedule(1.0, 175.0)
    assert (epochs, ms) == (175, [100, 125, 150]) and label.startswith("shortened: 175 of 350")
    assert dc.schedule(10.0, 1.0)[:2] == (1, [1, 1, 1])
