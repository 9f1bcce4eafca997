"""Damaged and poisoned files from outside: a kept metrics log, checkpoints, arrays files, leftover temporary files,
a filesystem without locks, paths that are not files. Each is refused with one line naming it (exit status 2), or
is a warning and the run goes on; a finished result is never taken away.

The run folders start from one real tiny run (made once per module, in this process) and are edited here."""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import math
import os
import re
import runpy
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from allconv import cifar_files as F
from allconv import data as D
from allconv import files, learning_curve
from allconv import preprocessing as pp
from allconv.csv_logger import CSVLogger
from allconv.errors import CheckpointError
from conftest import SRC, TINY, only_line, write_npz

EVAL_PY, VISUALIZE_PY, REPORT_PY = SRC / "eval.py", SRC / "visualize.py", SRC / "report.py"
NO_LOCKS = "two runs could now fit the same ZCA cache at once (the cache file is still written atomically)"


def _in_process(script: Path, *args: str, cwd: Path) -> int:
    """`python <script> args` in this process, as conftest's run_entry runs it, for a module-scoped fixture."""
    from hydra.core.global_hydra import GlobalHydra

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setattr(sys, "argv", [str(script), *args])
        mp.setenv("HYDRA_FULL_ERROR", "1")
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        finally:
            GlobalHydra.instance().clear()
    return 0


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A finished tiny All-CNN-C run (standardized data: no ZCA fit, width 0.125, one epoch, the CSV log)."""
    root = tmp_path_factory.mktemp("made")
    data = write_npz(root / "data.npz", n_train=48, n_test=20)
    run = root / "run"
    assert _in_process(SRC / "train.py", *TINY, "data=npz", f"data.path={data}", "data.preprocess=standardize",
                       f"hydra.run.dir={run}", cwd=root) == 0
    return run


@pytest.fixture
def interrupted(made, tmp_path) -> Path:
    """A copy of the run as a killed one leaves it: its log and last.ckpt, no metrics.json."""
    run = Path(shutil.copytree(made, tmp_path / "run")).resolve()
    (run / "metrics.json").unlink()
    return run


def ckpt_of(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


def _finite_rows(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    assert all(math.isfinite(float(c)) for row in rows for c in row if c), lines
    return rows


# -- a kept metrics log with cells that are not numbers; a figure that cannot be drawn -----------------------
def test_a_resume_drops_malformed_log_rows_and_a_figure_that_cannot_be_written_is_a_warning(run_entry, interrupted):
    log = interrupted / "csv" / "metrics.csv"
    text = log.read_text()
    header = text.splitlines()[0].split(",")
    damaged = io.StringIO()
    writer = csv.DictWriter(damaged, fieldnames=header, lineterminator="\n")
    for row in ({"epoch": "0", "step": "abc"}, {"epoch": "0", "step": "7", "lr": "nan"},
                {"epoch": "0", "step": "8", "lr": "1" + "0" * 400}, {"epoch": "0", "step": "9", "lr": "\0"}):
        writer.writerow(row)
    log.write_bytes((text + damaged.getvalue()).encode() + b"\xff\xfe,not text\n")
    (interrupted / "learning_curve.png").unlink()
    (interrupted / "learning_curve.png").mkdir()  # a folder in the figure's place: its write is refused
    code, out, err = run_entry(f"resume={interrupted}")
    assert code == 0, err[-3000:]
    assert json.loads((interrupted / "metrics.json").read_text())["status"] == "finished"
    png = interrupted / "learning_curve.png"
    assert err.splitlines() == [
        f"warning: {log}: dropped 5 malformed rows (row 3: step='abc' is not a finite number); kept 2",
        f"warning: cannot write {png}: Is a directory (EISDIR); the run's result stands "
        f"(python -m allconv.learning_curve {interrupted} redraws it)"]
    assert [row[header.index("step")] for row in _finite_rows(log)] == ["2", "3"]  # the epoch's row, the new test
    assert png.is_dir() and [p.name for p in interrupted.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("content, warning", [
    (b"epoch,step,train/loss\n0,9,1.0\n0,abc,2.0\n1,19,inf\n", "dropped 2 malformed rows (row 2: step='abc' is not "
                                                               "a finite number); kept 1"),
    (b"epoch,step,train/loss\n0,9,1.0\n0,10,1.0,5\n0,\"11\n", "dropped 2 malformed rows (row 2: is not a CSV row of "
                                                             "its header); kept 1"),
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "is not a metrics log (its header '\ufffdPNG' names no step column or repeats "
                                       "one); 3 earlier rows not kept"),
    (b"epoch,epoch,step\n0,0,9\n", "is not a metrics log (its header 'epoch,epoch,step' names no step column or "
                                   "repeats one); 1 earlier row not kept"),
], ids=["text and inf", "not rows of the header", "not CSV", "a repeated column"])
def test_the_csv_log_keeps_only_well_formed_rows_of_a_kept_file(tmp_path, capsys, content, warning):
    log = tmp_path / "csv" / "metrics.csv"
    log.parent.mkdir()
    log.write_bytes(content)
    logger = CSVLogger(str(tmp_path), name="csv", version="")
    assert logger.experiment
    assert only_line(capsys.readouterr().err) == (f"warning: {log}: {warning}" if warning.startswith("dropped")
                                                  else f"warning: {log} {warning}")
    logger.log_metrics({"epoch": 1, "train/loss": 0.5}, step=19)
    logger.save()
    kept = [r for r in _finite_rows(log) if r]
    assert kept[-1][-2:] == ["19", "0.5"] and len(kept) == (2 if warning.startswith("dropped") else 1)


def test_read_epochs_and_plot_run_skip_what_is_not_a_finite_number(tmp_path):
    log = tmp_path / "csv" / "metrics.csv"
    log.parent.mkdir()
    log.write_bytes(b"epoch,step,lr,train/loss\n0,9,0.05,2.0\nx,19,0.05,1.5\n1,19,abc,nan\n1.5,20,0.1,1.0\n"
                    b"2,29,1e999,\0\n-1,30,0.1,1.0\n3,39," + b"9" * 400 + b",0.5\n\xff,\xfe\n")
    assert learning_curve.read_epochs(log) == {"lr": {0: 0.05}, "train/loss": {0: 2.0, 3: 0.5}}
    assert learning_curve.plot_run(tmp_path / "csv" / "metrics.csv", tmp_path / "learning_curve.png") == \
        tmp_path / "learning_curve.png"


@pytest.mark.timeout(120)  # before the fix: opening the FIFO waited for a writer for good
def test_report_curves_beside_a_fifo_named_metrics_csv(run_entry, made, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(made, sweep / "0")
    shutil.copytree(made, sweep / "1")
    (sweep / "1" / "identity.json").unlink()  # else the report counts the copy once, and never opens its csv
    (sweep / "1" / "csv" / "metrics.csv").unlink()
    os.mkfifo(sweep / "1" / "csv" / "metrics.csv")
    code, out, err = run_entry(str(sweep), "--curves", "--no-plot", script=REPORT_PY)
    assert code == 0, err[-3000:]
    assert err.splitlines() == [f"-> {sweep}"] and (sweep / "curves.md").is_file()


# -- checkpoints: weights of another dtype, entries that are not tensors, structures no code should walk ------
def _deep(levels: int) -> dict:
    node: dict = {}
    top = node
    for _ in range(levels):
        node["k"] = {}
        node = node["k"]
    return top


def _craft(source: Path, dest: Path, kind: str) -> tuple[Path, str]:
    """A copy of the checkpoint at dest, changed as `kind` says; (its path, the refusal's text after its name)."""
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    sd, name = ckpt["state_dict"], "net.block2.conv1.weight"
    if kind in ("int64", "bool", "float64", "complex64"):
        sd[name] = sd[name].to(getattr(torch, kind))
        why = f": state_dict tensor {name!r} is {kind}, the network holds float32 there; refused, not cast"
    elif kind == "list":
        sd[name] = sd[name].tolist()
        why = f": state_dict entry {name!r} is list, not a tensor; refused"
    elif kind == "int":
        sd[name] = 3
        why = f": state_dict entry {name!r} is int, not a tensor; refused"
    elif kind == "sparse":
        sd[name] = sd[name].to_sparse()
        why = f": state_dict tensor {name!r} is a sparse_coo tensor, not a dense one; refused"
    else:
        config = ckpt["hyper_parameters"]["config"]
        if kind == "deep":
            config["deep"] = _deep(3000)
            why = " nests deeper than 32 levels"
        elif kind == "cycle":
            loop: list = []
            loop.append(loop)
            config["loop"] = loop
            why = " holds a container inside itself"
        else:  # one list shared 16 times at each of 10 levels: 16**10 values to a walk that follows each place
            shared: list = []
            for _ in range(10):
                shared = [shared] * 16
            config["shared"] = shared
            why = " holds more than 100000 values"
        why += "; an allconv checkpoint nests 7 levels and holds a few hundred values besides its tensors, refused"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))  # pickle writes a nested dict recursively
    try:
        torch.save(ckpt, dest)
    finally:
        sys.setrecursionlimit(limit)
    return dest, why


@pytest.mark.parametrize("kind", ["int64", "bool", "float64", "complex64", "list", "int", "sparse", "deep", "cycle",
                                  pytest.param("shared", marks=pytest.mark.timeout(120))])
def test_eval_refuses_a_checkpoint_whose_weights_or_structure_are_not_a_runs(run_entry, made, tmp_path, kind):
    forged, why = _craft(ckpt_of(made), tmp_path / "forged.ckpt", kind)
    code, out, err = run_entry(f"ckpt_path={forged}", f"hydra.run.dir={tmp_path / 'eval'}", script=EVAL_PY)
    assert code == 2
    assert only_line(err) == f"error: checkpoint '{forged}'{why}"
    assert not (tmp_path / "eval").exists()


# -- arrays files: class names, and arrays larger than this machine's memory ---------------------------------
@pytest.mark.parametrize("classes, shown", [
    (np.array("x"), "() <U1"),
    (np.array([f"c{i}" for i in range(9)]), "(9,) <U2"),
    (np.arange(10), "(10,) int64"),
])
def test_a_bad_classes_array_is_one_line_before_a_run_folder(run_entry, tmp_path, classes, shown):
    path = write_npz(tmp_path / "d.npz", n_train=16, n_test=8, classes=classes)
    code, out, err = run_entry(*TINY, "data=npz", f"data.path={path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    assert only_line(err) == (f"error: classes in '{path}' has shape {shown}; allowed: (10,) strings, one name per "
                              f"class (data.num_classes=10)")
    assert not (tmp_path / "run").exists()


def _raw_deflate(header: bytes, zeros: int) -> tuple[bytes, int]:
    """(a raw deflate stream of header + `zeros` zero bytes, its CRC-32 when zeros is small enough to count)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = 1 << 24
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)  # the state is reset: every chunk compresses alike
    n, rest = divmod(zeros, chunk)
    stream = head + block * n + c.compress(bytes(rest)) + c.flush()
    crc = zlib.crc32(bytes(zeros), zlib.crc32(header)) if zeros <= 64 << 20 else 0  # the big one is never read
    return stream, crc


def _zip64(path: Path, members: dict[str, tuple[bytes, int, int]]) -> Path:
    """A zip file of deflated members {name: (raw stream, uncompressed size, crc)}, sizes in zip64 records."""
    with open(path, "wb") as f:
        central = []
        for name, (stream, size, crc) in members.items():
            offset, n = f.tell(), name.encode()
            extra = struct.pack("<HHQQ", 1, 16, size, len(stream))
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(n),
                                len(extra)) + n + extra + stream)
            extra = struct.pack("<HHQQ", 1, 16, size, len(stream))
            central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 8, 0, 0x21, crc, 0xFFFFFFFF,
                                       0xFFFFFFFF, len(n), len(extra), 0, 0, 0, 0, offset) + n + extra)
        start = f.tell()
        f.write(b"".join(central))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), f.tell() - start, start, 0))
    return path


def _npy(shape: tuple, dtype) -> bytes:
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                "fortran_order": False, "shape": shape})
    return head.getvalue()


def test_arrays_larger_than_this_machines_memory_are_refused_from_their_headers(tmp_path):
    """Zeros deflate about a thousandfold, so a file of a thousandth of the memory declares more than all of it."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    n = memory // (32 * 32 * 3) + 1
    members = {}
    for name, shape in (("x_train", (n, 32, 32, 3)), ("y_train", (n,)), ("x_test", (2, 32, 32, 3)), ("y_test", (2,))):
        header, size = _npy(shape, np.uint8), math.prod(shape)
        stream, crc = _raw_deflate(header, size)
        members[f"{name}.npy"] = (stream, len(header) + size, crc)
    path = _zip64(tmp_path / "huge.npz", members)
    assert path.stat().st_size < memory // 500
    with pytest.raises(D.DataError) as e:
        F.check_npz(path, 10)
    total = n * 3072 + n + 2 * 3072 + 2
    assert str(e.value) == (f"data.path '{path}' declares {total / 1e9:.1f} GB of arrays (x_train ({n}, 32, 32, 3) "
                            f"uint8), more than this machine's {memory / 1e9:.1f} GB of memory (CIFAR-10 takes 0.18 "
                            f"GB); refused before loading")
    cifar = write_npz(tmp_path / "small.npz", n_train=16, n_test=8)
    assert F.check_npz(cifar, 10) == 16  # the same file format, within memory: read


# -- temporary files of killed writes -------------------------------------------------------------------------
def test_a_write_removes_the_temporary_files_killed_writes_of_its_target_left(tmp_path):
    target = tmp_path / "metrics.json"
    killed = tmp_path / ".metrics.json.k1ll3d_x.tmp"  # mkstemp's 8 characters, as write_atomic names them
    killed.write_text("half")
    hour_ago = killed.stat().st_mtime - 3600
    os.utime(killed, (hour_ago, hour_ago))
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep me")
    link = tmp_path / ".metrics.json.l1nk3d_x.tmp"
    link.symlink_to(elsewhere)
    live = tmp_path / ".metrics.json.wr1t1ng_.tmp"  # another process's write of the same target, in progress
    live.write_text("writing")
    other = tmp_path / ".metrics.json.bak.k1ll3d_x.tmp"  # a killed write of another target (metrics.json.bak)
    other.write_text("half")
    os.utime(other, (hour_ago, hour_ago))
    folder = tmp_path / ".metrics.json.f0ld3r__.tmp"
    folder.mkdir()
    files.write_atomic(target, b"{}\n")
    assert target.read_text() == "{}\n"
    assert not killed.exists() and not link.is_symlink() and elsewhere.read_text() == "keep me"
    assert live.read_text() == "writing" and other.exists() and folder.is_dir()


# -- a filesystem without locks ---------------------------------------------------------------------------------
def _lockless(monkeypatch, code: int, only=lambda path: True) -> None:
    """flock fails with `code` on the files `only` accepts, as on Lustre without flock or NFS without lockd."""
    real = fcntl.flock

    def flock(fd, op):
        if only(os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")):
            raise OSError(code, os.strerror(code))
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def test_lock_on_a_filesystem_without_locks_warns_once_per_path_and_goes_on(tmp_path, monkeypatch, capsys, code):
    path = tmp_path / "x.lock"
    _lockless(monkeypatch, code)
    with open(path, "w") as f:
        for blocking in (True, False):
            assert files.lock(f.fileno(), path, blocking=blocking, guards="nothing is guarded") is False
    name = errno.errorcode[code]
    assert only_line(capsys.readouterr().err) == \
        f"warning: cannot lock {path}: {os.strerror(code)} ({name}); nothing is guarded"


def test_lock_held_by_another_open_file_is_blocking_io_error(tmp_path, monkeypatch, capsys):
    path = tmp_path / "x.lock"
    with open(path, "w") as mine, open(path, "w") as theirs:  # two open files: flock treats them as two holders
        assert files.lock(theirs.fileno(), path, blocking=False, guards="-") is True
        with pytest.raises(BlockingIOError):
            files.lock(mine.fileno(), path, blocking=False, guards="-")
        _lockless(monkeypatch, errno.EIO)  # a lock that failed, not a filesystem without locks: not a warning
        with pytest.raises(OSError) as e:
            files.lock(mine.fileno(), path, blocking=True, guards="-")
    assert e.value.errno == errno.EIO and capsys.readouterr().err == ""


def test_zca_cache_without_locks_is_fitted_and_written_with_one_warning(tmp_path, monkeypatch, capsys):
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))  # a small D: the fit is instant
    _lockless(monkeypatch, errno.ENOSYS)
    zca, cached = pp.fit_zca_cached(x, "k", tmp_path / "zca")
    assert not cached and torch.equal(zca.P, pp.ZCA().fit(x).P)
    assert only_line(capsys.readouterr().err) == (f"warning: cannot lock {tmp_path / 'zca' / 'zca-k.lock'}: "
                                                  f"Function not implemented (ENOSYS); {NO_LOCKS}")
    assert pp.fit_zca_cached(x, "k", tmp_path / "zca")[1] is True  # written whole: the next run loads it
    assert capsys.readouterr().err == ""  # once per path


def test_a_run_whose_zca_cache_cannot_be_locked_trains_on_with_one_warning(run_entry, tmp_path, monkeypatch):
    data = write_npz(tmp_path / "data.npz", n_train=48, n_test=20)  # the suite's common tiny data: one ZCA fit
    _lockless(monkeypatch, errno.ENOLCK, only=lambda path: path.endswith(".lock"))  # the cache's filesystem only
    monkeypatch.setattr(files, "_warned_lockless", set())
    code, out, err = run_entry(*TINY, "data=npz", f"data.path={data}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err[-3000:]
    cache = re.escape(os.environ["ALLCONV_CACHE"])
    assert re.fullmatch(rf"warning: cannot lock {cache}/zca-[0-9a-f]{{16}}\.lock: No locks available \(ENOLCK\); "
                        rf"{re.escape(NO_LOCKS)}", only_line(err)), err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "finished"


# -- paths that are not files, settings this machine cannot honour -----------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_visualize_on_cuda_without_a_gpu_is_one_line(run_entry, tmp_path):
    code, out, err = run_entry(f"ckpt_path={tmp_path / 'last.ckpt'}", "device=cuda", script=VISUALIZE_PY)
    assert code == 2
    assert only_line(err) == "error: device=cuda: this machine has no CUDA GPU; use device=auto or device=cpu"


def _not_a_file(tmp_path: Path, kind: str) -> Path:
    if kind == "folder":
        (tmp_path / "ckpt").mkdir()
    elif kind == "FIFO":
        os.mkfifo(tmp_path / "ckpt")
    elif kind == "device":
        return Path(os.devnull)
    else:
        (tmp_path / "ckpt").write_bytes(b"")
    return tmp_path / "ckpt"


@pytest.mark.timeout(60)  # a FIFO must not be opened for reading: that waits for a writer
@pytest.mark.parametrize("script", [EVAL_PY, VISUALIZE_PY], ids=["eval", "visualize"])
@pytest.mark.parametrize("kind", ["folder", "FIFO", "device", "empty file"])
def test_a_ckpt_path_that_is_not_a_checkpoint_file_is_one_line(run_entry, tmp_path, script, kind):
    path = _not_a_file(tmp_path, kind)
    out_dir = f"hydra.run.dir={tmp_path / 'out'}" if script == EVAL_PY else f"out_dir={tmp_path / 'out'}"
    code, out, err = run_entry(f"ckpt_path={path}", out_dir, script=script)
    assert code == 2
    what = f"is a {kind}, not a checkpoint file; give ckpt_path=<run dir>/checkpoints/last.ckpt"
    if kind == "empty file":
        what = "is truncated or corrupt (EOFError); use an earlier checkpoint or start the run again"
    assert only_line(err) == f"error: checkpoint '{path}' {what}"
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["folder", "FIFO", "device"])
def test_a_data_path_that_is_not_a_file_is_one_line(run_entry, tmp_path, kind):
    path = _not_a_file(tmp_path, kind)
    code, out, err = run_entry(*TINY, "data=npz", f"data.path={path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    assert only_line(err) == (f"error: data.path '{path}' is a {kind}; expected an .npz with x_train, y_train, "
                              f"x_test, y_test")


def test_visualize_into_an_out_dir_that_is_a_file_is_one_line(run_entry, made, tmp_path):
    out = tmp_path / "taken"
    out.write_text("mine")
    code, _, err = run_entry(f"ckpt_path={ckpt_of(made)}", f"out_dir={out}", "viz.figure=filters", "device=cpu",
                             script=VISUALIZE_PY)
    assert code == 2
    assert only_line(err) == f"error: out_dir '{out}' exists and is not a directory" and out.read_text() == "mine"


def test_a_checkpoint_saved_in_one_precision_throughout_is_read(made, tmp_path):
    """trainer.precision=bf16-true saves every weight as bfloat16: a run's own file, read (not a forged dtype)."""
    from allconv import checkpoint

    ckpt = torch.load(ckpt_of(made), map_location="cpu", weights_only=True)
    ckpt["state_dict"] = {k: t.to(torch.bfloat16) for k, t in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "bf16.ckpt")
    net = checkpoint.module_from(checkpoint.read(tmp_path / "bf16.ckpt"), tmp_path / "bf16.ckpt").net
    assert all(torch.equal(p, ckpt["state_dict"][f"net.{k}"].float()) for k, p in net.state_dict().items())


def test_checkpoint_read_names_the_file_and_the_dtype(made, tmp_path):
    from allconv import checkpoint

    forged, why = _craft(ckpt_of(made), tmp_path / "forged.ckpt", "int64")
    with pytest.raises(CheckpointError) as e:
        checkpoint.module_from(checkpoint.read(forged), forged)
    assert str(e.value) == f"checkpoint '{forged}'{why}"
