"""Bad input through src/train.py: exit status 2 and exactly one line on stderr naming the value and what is
allowed, nothing written. A run whose loss turns non-finite: exit status 1 and one line.

Every case runs the entry point in this process (run_entry: its argv, its __main__); a few run it as a real
process too, where the exit status and stderr are the interpreter's."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, only_line, write_npz


def snapshot(root: Path) -> dict:
    """Every path under root with its size and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else None, st.st_mtime_ns)
    return out


def _npz(tmp: Path, kind: str) -> Path:
    path = tmp / f"{kind}.npz"
    if kind == "corrupt":
        write_npz(path, n_train=16, n_test=8)
        path.write_bytes(path.read_bytes()[:500])
    elif kind == "shape":
        write_npz(path, n_train=16, n_test=8, x_train=np.zeros((16, 3, 32, 32), np.uint8))
    elif kind == "dtype":
        write_npz(path, n_train=16, n_test=8, x_test=np.zeros((8, 32, 32, 3), np.float64))
    elif kind == "labels":
        write_npz(path, n_train=16, n_test=8, y_train=np.array([0] * 15 + [12]))
    elif kind == "ok":
        write_npz(path, n_train=16, n_test=8)
    return path


# (id, overrides builder (tmp -> list), substrings the last line must hold: the value, what is allowed)
CASES = [
    ("unknown_model", lambda t: ["model=all_cnn_d"], ["all_cnn_d", "allowed", "all_cnn_c", "model_a"]),
    ("unknown_variant", lambda t: ["model/variant=pooled"], ["pooled", "allowed", "allcnn", "strided"]),
    ("negative_lr", lambda t: ["optim.lr=-0.1"], ["optim.lr", "-0.1", "positive"]),
    ("dropout_one", lambda t: ["model.dropout_input=1.0"], ["dropout_input", "1.0", "[0, 1)"]),
    ("dropout_negative", lambda t: ["model.dropout_pool=-0.2"], ["dropout_pool", "-0.2", "[0, 1)"]),
    ("width_zero", lambda t: ["model.width=0"], ["model.width", "0", "positive"]),
    ("unknown_key", lambda t: ["optim.lrr=0.1"], ["optim.lrr", "+key=value"]),
    ("missing_root_no_download",
     lambda t: ["data=cifar10", f"data.root={t / 'no_such_root'}", "data.download=false"],
     ["no_such_root", "data.download=false", "data.download=true"]),
    ("npz_missing", lambda t: ["data=npz", f"data.path={t / 'nope.npz'}"], ["nope.npz", "x_train"]),
    ("npz_corrupt", lambda t: ["data=npz", f"data.path={_npz(t, 'corrupt')}"], ["corrupt.npz", "x_train"]),
    ("npz_shape", lambda t: ["data=npz", f"data.path={_npz(t, 'shape')}"], ["(16, 3, 32, 32)", "(N, 32, 32, 3)"]),
    ("npz_dtype", lambda t: ["data=npz", f"data.path={_npz(t, 'dtype')}"], ["float64", "uint8"]),
    ("npz_labels", lambda t: ["data=npz", f"data.path={_npz(t, 'labels')}"], ["label 12", "0..9"]),
    ("root_under_a_file", lambda t: ["data=cifar10", f"data.root={_file(t) / 'sub'}", "data.download=true"],
     ["a_file", "cannot be written"]),
]


def _file(tmp: Path) -> Path:
    p = tmp / "a_file"
    p.write_text("not a folder\n")
    return p


def check_rejected(run, tmp_path: Path, overrides: list[str], expect: list[str]) -> str:
    """run: run_entry (in this process) or run_train (a process)."""
    run_dir = tmp_path / "run"
    before = snapshot(tmp_path)
    rc, out, err = run(*overrides, f"hydra.run.dir={run_dir}", "trainer.max_epochs=1",
                             f"data.cache_dir={tmp_path / 'zca'}", cwd=tmp_path)
    assert rc == 2, (rc, out[-2000:], err[-3000:])
    line = only_line(err)  # the whole of stderr: no warning, no traceback, no Hydra report
    assert line.startswith("error: "), err
    for s in expect:
        assert s in line, (s, line)
    assert not run_dir.exists()
    assert snapshot(tmp_path) == before  # nothing written, nothing changed
    assert "test error" not in out
    return line


@pytest.mark.parametrize("case_id,make,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_before_training(run_entry, tmp_path, case_id, make, expect):
    work = tmp_path / "w"
    work.mkdir()
    check_rejected(run_entry, work, make(work), expect)


PROCESS_CASES = [c for c in CASES if c[0] in ("unknown_key", "npz_labels")]  # Hydra's composition, allconv's check


@pytest.mark.parametrize("case_id,make,expect", PROCESS_CASES, ids=[c[0] for c in PROCESS_CASES])
def test_bad_input_in_a_real_process(run_train, tmp_path, case_id, make, expect):
    work = tmp_path / "w"
    work.mkdir()
    check_rejected(run_train, work, make(work), expect)


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder this user cannot write: mode 0555, or for root (who ignores modes) a read-only tmpfs mounted there."""
    path.mkdir()
    path.chmod(0o555)
    mounted = False
    try:
        if not os.access(path, os.W_OK):
            yield path
            return
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"{path} stays writable for this user and mount is not permitted here")
        mounted = True
        yield path
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)
        path.chmod(0o755)


def test_read_only_data_root(run_entry, tmp_path):
    with read_only_folder(tmp_path / "ro") as ro:
        check_rejected(run_entry, tmp_path, ["data=cifar10", f"data.root={ro / 'cifar'}", "data.download=true"],
                       ["ro/cifar", "cannot be written"])


def test_sweep_with_one_bad_value_fails_before_any_job(run_entry, tmp_path):
    check_rejected(run_entry, tmp_path, ["-m", "optim.lr=0.1,-1"], ["optim.lr", "-1", "positive"])
    assert not (tmp_path / "multirun").exists()


def test_non_finite_loss_exits_1_with_one_line(run_train, tmp_path):
    """lr 1e30 without the update cap: the weights overflow in the first steps and the loss turns NaN."""
    data = write_npz(tmp_path / "data.npz", n_train=48, n_test=16)
    run = tmp_path / "run"
    rc, out, err = run_train(*TINY, "data=npz", f"data.path={data}", "data.preprocess=standardize", "optim.lr=1e30",
                             "optim.max_update_norm=null", "trainer.max_epochs=2", "logger=none",
                             f"hydra.run.dir={run}")
    assert rc == 1, (rc, out[-2000:], err[-3000:])
    line = only_line(err)
    assert line.startswith("error: non-finite loss at epoch 0, step "), line
    assert "test error" not in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["error"] == line[len("error: "):]
    assert not (run / "checkpoints" / "last.ckpt").exists()  # the diverged epoch was not saved


def _rejected_folder(run_entry, tmp_path, *args):
    before = snapshot(tmp_path)
    rc, out, err = run_entry(*args, "trainer.max_epochs=1", cwd=tmp_path)
    assert rc == 2, (rc, out[-2000:], err[-3000:])
    line = only_line(err)
    assert snapshot(tmp_path) == before and "test error" not in out
    return line


def test_run_folder_under_a_file_is_one_line(run_entry, tmp_path):
    (tmp_path / "afile").write_text("x")
    line = _rejected_folder(run_entry, tmp_path, f"hydra.run.dir={tmp_path / 'afile' / 'run'}")
    assert line.startswith("error: hydra.run.dir=") and "afile" in line and "is a file" in line


def test_run_folder_that_cannot_be_written_is_one_line(run_entry, tmp_path):
    with read_only_folder(tmp_path / "ro") as ro:
        line = _rejected_folder(run_entry, tmp_path, f"hydra.run.dir={ro}")
        assert line.startswith(f"error: hydra.run.dir='{ro}' cannot be written"), line
        line = _rejected_folder(run_entry, tmp_path, f"hydra.run.dir={ro / 'new' / 'run'}")
        assert f"cannot be created: '{ro}' is not writable" in line, line


def test_sweep_folder_that_cannot_be_created_fails_before_any_job(run_entry, tmp_path):
    (tmp_path / "afile").write_text("x")
    line = _rejected_folder(run_entry, tmp_path, "-m", "optim.lr=0.1,0.05",
                            f"hydra.sweep.dir={tmp_path / 'afile' / 's'}")
    assert line.startswith("error: hydra.sweep.dir=") and "is a file" in line
