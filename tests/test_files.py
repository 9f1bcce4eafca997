"""Machine faults: a full disk, a read-only or forbidden folder, a preempted job, and the cost estimate.

A "disk" is a small tmpfs mounted for the test where mounting is permitted (root), else a folder
whose real write calls are made to fail (os.write / os.open / os.mkdir raise for paths inside it).
End to end, a real `python src/train.py` runs out of space at its second checkpoint, or gets SIGTERM
mid-training, and `resume=` then ends with the test error and weights of an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from allconv import preprocessing, run_record, training, visualize
from allconv.callbacks import AtomicCheckpointIO, CostEstimate
from allconv.csv_logger import CSVLogger
from allconv.data import DeviceLoader
from allconv.errors import Interrupted, WriteError
from allconv.learning_curve import plot_run, read_epochs
from conftest import PYTHON, TINY, TRAIN_PY, last_line, write_npz

REASONS = {errno.ENOSPC: "No space left on device (ENOSPC)", errno.EROFS: "Read-only file system (EROFS)",
           errno.EACCES: "Permission denied (EACCES)"}


def _mount(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


class Disk:
    """A folder that can be made full (ENOSPC), read-only (EROFS) or forbidden (EACCES), then given back."""

    def __init__(self, path: Path, tmpfs: bool, monkeypatch):
        self.path, self.tmpfs = path, tmpfs
        self._failing: dict[str, int] = {}  # system call -> errno it raises for paths under self.path
        # The real calls, wrapped: they fail only while _failing names them (patched mode, or EACCES as root).
        real_write, real_open, real_mkdir = os.write, os.open, os.mkdir

        def inside(p) -> bool:
            return str(Path(os.path.abspath(p))).startswith(str(self.path))

        def refuse(call: str, p) -> None:
            if call in self._failing and inside(p):
                raise OSError(self._failing[call], os.strerror(self._failing[call]), str(p))

        def write(fd, data):
            if "write" in self._failing:
                refuse("write", os.readlink(f"/proc/self/fd/{fd}"))
            return real_write(fd, data)

        def open_(p, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse("open", p)
            return real_open(p, flags, *args, **kwargs)

        def mkdir(p, *args, **kwargs):
            if not os.path.isdir(p):
                refuse("open", p)
            return real_mkdir(p, *args, **kwargs)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "mkdir", mkdir)

    def full(self) -> None:
        if not self.tmpfs:
            self._failing = {"write": errno.ENOSPC}
            return
        fd = os.open(self.path / ".filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def read_only(self) -> None:
        if not self.tmpfs:
            self._failing = {"open": errno.EROFS}
            return
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True, capture_output=True)

    def forbidden(self) -> None:
        """EACCES: a folder without write permission; root ignores permissions, so there the open call fails."""
        if os.geteuid() != 0:
            os.chmod(self.path, 0o555)
        else:
            self._failing = {"open": errno.EACCES}

    def give_back(self) -> None:
        self._failing = {}
        if self.tmpfs:
            subprocess.run(["mount", "-o", "remount,rw", str(self.path)], capture_output=True)
            (self.path / ".filler").unlink(missing_ok=True)
        os.chmod(self.path, 0o755)

    def temporaries(self) -> list[Path]:
        return [p for p in self.path.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(params=["tmpfs", "patched"])
def disk(request, tmp_path, monkeypatch):
    path = tmp_path / "disk"
    if request.param == "tmpfs":
        if not _mount(path, "2m"):
            pytest.skip("mounting a tmpfs is not permitted here (the patched variant covers the same cases)")
        request.addfinalizer(lambda: _umount(path))
    else:
        path.mkdir()
    return Disk(path, request.param == "tmpfs", monkeypatch)


# -- each kind of file, written once whole, then refused ----------------------------------------------------

def _checkpoint(path: Path, value: float) -> None:
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((1000,), value)}}, path)


def _check_checkpoint(path: Path, value: float) -> None:
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.full((1000,), value))


def _json(path: Path, value: float) -> None:
    run_record.write_json(path, {"test_error": value})


def _check_json(path: Path, value: float) -> None:
    assert json.loads(path.read_text()) == {"test_error": value}


def _figure(path: Path, value: float) -> None:
    visualize.save_png(torch.full((3, 8, 8), value), path)


def _check_figure(path: Path, value: float) -> None:
    from PIL import Image

    with Image.open(path) as im:
        assert im.size == (8, 8) and im.getpixel((0, 0))[0] == round(255 * value)


def _curve(path: Path, value: float) -> None:
    log = path.parent / "csv" / "metrics.csv"  # the run's CSV log, which plot_run reads
    if not log.exists():
        log.parent.mkdir()
        log.write_text("epoch,step,train/acc,train/loss\n0,9,0.1,2.3\n1,19,0.2,2.1\n")
    assert plot_run(log, path, title=f"run {value}") == path


def _check_curve(path: Path, value: float) -> None:
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 1000


KINDS = {  # file name -> (write it with value, check it holds value)
    "checkpoints/last.ckpt": (_checkpoint, _check_checkpoint),
    "metrics.json": (_json, _check_json),
    "guided_backprop/epoch_001.png": (_figure, _check_figure),
    "learning_curve.png": (_curve, _check_curve),
}


@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("fault", ["full", "read_only", "forbidden"])
def test_refused_write_is_one_error_naming_the_file_and_keeps_the_previous_file(disk, name, fault):
    write, check = KINDS[name]
    path = disk.path / name
    write(path, 0.25)
    getattr(disk, fault)()
    code = {"full": errno.ENOSPC, "read_only": errno.EROFS, "forbidden": errno.EACCES}[fault]
    with pytest.raises(WriteError) as info:
        write(path, 0.5)
    assert str(info.value) == f"cannot write {path}: {REASONS[code]}"
    assert info.value.exit_code == 1 and info.value.errno == code
    assert disk.temporaries() == []
    check(path, 0.25)  # the previous version, whole
    disk.give_back()
    write(path, 0.5)
    check(path, 0.5)


def test_csv_log_full_disk_keeps_the_rows_written_and_retries_them(disk):
    logger = CSVLogger(str(disk.path), name="csv", version="")
    logger.log_hyperparams({"lr": 0.05})
    logger.log_metrics({"train/loss": 2.0, "epoch": 0}, step=9)
    logger.save()
    csv_path = disk.path / "csv" / "metrics.csv"
    before = csv_path.read_text()
    disk.full()
    logger.log_metrics({"train/loss": 1.0, "epoch": 1}, step=19)
    with pytest.raises(WriteError, match=rf"^cannot write {csv_path}: No space left on device \(ENOSPC\)$"):
        logger.save()
    assert csv_path.read_text() == before and disk.temporaries() == []
    logger.finalize("failed")  # a failing run's own error is the one reported: no second error here
    disk.give_back()
    logger.save()
    assert [ln.split(",")[:2] for ln in csv_path.read_text().splitlines()] == \
        [["epoch", "step"], ["0", "9"], ["1", "19"]]  # the row refused before is written now
    assert "lr: 0.05" in (disk.path / "csv" / "hparams.yaml").read_text()


def test_csv_log_of_a_resumed_run_keeps_the_earlier_rows(tmp_path):
    first = CSVLogger(str(tmp_path), name="csv", version="")
    for epoch, step in ((0, 9), (1, 19), (2, 29)):
        first.log_metrics({"epoch": epoch, "train/loss": 1.0 / (epoch + 1)}, step=step)
    first.save()  # epoch 2 was logged, but the run died before its checkpoint: resume from the end of epoch 1
    again = CSVLogger(str(tmp_path), name="csv", version="")
    assert again.experiment  # Lightning's writer removes metrics.csv as it starts; the rows are put back
    assert len((tmp_path / "csv" / "metrics.csv").read_text().splitlines()) == 4
    again.log_metrics({"epoch": 2, "train/loss": 0.3}, step=29)
    again.save()
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    assert rows == ["epoch,step,train/loss", "0,9,1.0", "1,19,0.5", "2,29,0.3"]


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_unwritable_whitening_cache_warns_once_and_uses_the_fit(disk, fault, capsys):
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))  # a small D: the fit is instant
    (disk.path / "zca").mkdir()
    getattr(disk, fault)()
    zca, cached = preprocessing.fit_zca_cached(x, "k", disk.path / "zca")
    assert not cached and torch.equal(zca.P, preprocessing.ZCA().fit(x).P)
    err = capsys.readouterr().err
    path = disk.path / "zca" / "zca-k.pt"
    reason = REASONS[errno.ENOSPC if fault == "full" else errno.EROFS]
    assert err == f"warning: cannot write {path}: {reason}; the whitening fit is used from memory\n"
    assert not path.exists() and disk.temporaries() == []


# -- the signal at each kind of boundary, in process: resume ends as the uninterrupted run -------------------

class _SignalAt(L.Callback):
    """Send a signal to this process, as a cluster would, at one point of epoch 1."""

    def __init__(self, where: str, signum: int):
        self.where, self.signum = where, signum

    def _send(self, trainer, where: str) -> None:
        if trainer.current_epoch == 1 and where == self.where and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        last = batch_idx == trainer.num_training_batches - 1
        self._send(trainer, "step 2" if batch_idx == 1 else "last step" if last else "")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._send(trainer, "validation")

    def on_train_epoch_start(self, trainer, pl_module):
        self._send(trainer, "epoch start")


def _stop_before_the_step_as_ddp_does(monkeypatch) -> None:
    """Under DDP, Lightning broadcasts rank 0's signal flag at the start of each step and stops there, before the
    epoch's first batch is drawn when the signal came at the epoch's start; one process stops only after a step.
    That broadcast's stop, in one process (the 2-process run is the SLURM check's DDP job)."""
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    advance = _TrainingEpochLoop.advance

    def broadcast_then_advance(self, data_fetcher):
        if self.trainer.received_sigterm:
            raise SIGTERMException()
        return advance(self, data_fetcher)

    monkeypatch.setattr(_TrainingEpochLoop, "advance", broadcast_then_advance)


def _inprocess_cfg(tmp: Path, val_size: int):
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    data = tmp / "small.npz"
    if not data.exists():
        write_npz(data, n_train=160, n_test=32)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[
            "data=npz", f"data.path={data}", *TINY, "data.preprocess=standardize", f"data.val_size={val_size}",
            "data.batch_size=32", "trainer.max_epochs=2", "logger=none"])  # 4 or 5 steps per epoch; epoch 1 is hit


@pytest.fixture(scope="module")
def inprocess_reference(tmp_path_factory):
    """Uninterrupted in-process runs, without and with a validation split: (folder, metrics, weights)."""
    tmp = tmp_path_factory.mktemp("inprocess")
    done = {}

    def get(val_size: int):
        if val_size not in done:
            run = tmp / f"reference_val{val_size}"
            done[val_size] = training.train(_inprocess_cfg(tmp, val_size), run), _weights(run)
        return (tmp, *done[val_size])

    return get


@pytest.mark.parametrize("where, signum, val_size, said", [
    ("step 2", signal.SIGTERM, 32, "at epoch 1, step 2 of 4: saved {ckpt}"),
    ("last step", signal.SIGINT, 0, "at the end of epoch 1: saved {ckpt}"),
    ("last step", signal.SIGTERM, 32, "during validation of epoch 1; continue from the last checkpoint with: "),
    ("epoch start", signal.SIGUSR2, 0, "at epoch 1, step 0 of 5: saved {ckpt}"),
], ids=["mid-epoch", "end-of-epoch", "validation", "ddp-epoch-start"])
def test_signal_at_each_boundary_then_resume_matches_uninterrupted(inprocess_reference, monkeypatch, capsys,
                                                                   where, signum, val_size, said):
    from allconv import callbacks

    tmp, ref_metrics, ref_weights = inprocess_reference(val_size)
    cfg = _inprocess_cfg(tmp, val_size)
    run = tmp / f"{where.replace(' ', '_')}_val{val_size}"
    ckpt = run / "checkpoints" / "last.ckpt"
    build = callbacks.build_callbacks
    monkeypatch.setattr(callbacks, "build_callbacks", lambda c, d: build(c, d) + [_SignalAt(where, signum)])
    if where == "epoch start":
        _stop_before_the_step_as_ddp_does(monkeypatch)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when the suite runs as a background job
    with pytest.raises(Interrupted) as info, callbacks.interrupted_as_error():
        training.train(cfg, run)
    monkeypatch.undo()
    e, name = info.value, signal.Signals(signum).name
    assert e.exit_code == 128 + signum and e.status == "interrupted"
    assert str(e).startswith(f"interrupted by {name} " + said.format(ckpt=ckpt)) and str(e).endswith(f"resume={run}")
    # Only this line is ours; in a long pytest session Lightning's logger may add its own lines.
    err_lines = capsys.readouterr().err.splitlines()
    assert any(ln.startswith(f"{name}: stopping at the end of this step") for ln in err_lines), err_lines[-10:]
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are given back

    cfg.ckpt_path = str(ckpt)
    metrics = training.train(cfg, run)
    assert (metrics["test_error"], metrics.get("val_error"), metrics["epochs"]) == \
        (ref_metrics["test_error"], ref_metrics.get("val_error"), ref_metrics["epochs"])
    weights = _weights(run)
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


# -- a checkpoint written mid-epoch: the loader continues where the epoch stood ----------------------------

def test_loader_state_resumes_the_epoch_with_the_same_batches_and_augmentation():
    x, y = torch.randn(50, 3, 8, 8), torch.arange(50)

    def loader(epoch: int) -> DeviceLoader:
        return DeviceLoader(x, y, 8, shuffle=True, augment=True, translate=2, seed=4, epoch=lambda: epoch)

    whole = list(loader(3))
    first = loader(3)
    batches = iter(first)
    for _ in range(3):
        next(batches)
    state = first.state_dict()  # what Lightning stores in a checkpoint after the third step
    resumed = loader(3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(whole) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, whole[3:], strict=True))
    later = loader(4)  # a state from another epoch (an end-of-epoch checkpoint) does not apply
    later.load_state_dict(state)
    assert len(list(later)) == len(whole)

    epoch = [3]  # the trainer's epoch moves on before the next epoch's first batch is drawn
    running = DeviceLoader(x, y, 8, shuffle=True, augment=True, translate=2, seed=4, epoch=lambda: epoch[0])
    assert len(list(running)) == len(whole)
    epoch[0] = 4
    batches = iter(running)  # Lightning's iter() at the epoch start; no batch asked for yet
    at_start = running.state_dict()  # a checkpoint here (a DDP stop at step 0) holds epoch 3's count
    assert at_start["epoch"] == 3 and at_start["served"] == len(whole)
    resumed = loader(4)
    resumed.load_state_dict(at_start)
    assert len(list(resumed)) == len(whole) == len(list(batches))  # epoch 4 is trained whole, not skipped


# -- the cost estimate ------------------------------------------------------------------------------------

class _StopWhenEstimated(CostEstimate):
    """The estimate, then stop: the run's length only enters the arithmetic."""

    def _report(self, trainer, per_step, now):
        super()._report(trainer, per_step, now)
        trainer.should_stop = True


@pytest.mark.parametrize("epochs, long", [(2, False), (10_000_000, True)])
def test_cost_estimate_line_and_the_cpu_advice(compose_cfg, tmp_path, capsys, epochs, long):
    data = write_npz(tmp_path / "d.npz", n_train=64, n_test=16)
    cfg = compose_cfg("data=npz", f"data.path={data}", *TINY, "data.batch_size=32", "data.preprocess=standardize")
    estimate = _StopWhenEstimated()
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=[estimate], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(training.build_module(cfg), datamodule=training.build_datamodule(cfg))
    line = estimate.line
    assert capsys.readouterr().out.splitlines().count(line) == 1
    assert line.startswith(f"estimate: {epochs} epochs x ") and " per epoch (2 steps x " in line
    assert line.split(" -> ")[1].split(" of training on ")[1].startswith("cpu")
    assert ("experiment=quick_cpu (make train-jpeg)" in line) == long
    per_step = float(line.split("(2 steps x ")[1].split(")")[0].split()[0])
    assert per_step > 0


# -- end to end: a real run out of space, a real run preempted; resume= ends where an uninterrupted run ends --

EPOCHS = 3


def _args(tmp: Path, run: Path, cache: Path) -> list[str]:
    data = tmp / "data.npz"
    if not data.exists():
        write_npz(data, n_train=352, n_test=32)
    return ["data=npz", f"data.path={data}", f"data.cache_dir={cache}", "model.width=0.125",
            f"trainer.max_epochs={EPOCHS}", "data.batch_size=32", "data.val_size=32", "trainer.accelerator=cpu",
            "callbacks.progress_bar=none", "trainer.enable_progress_bar=false", "print_config=false",
            "callbacks.guided_backprop.every_n_epochs=0", f"hydra.run.dir={run}"]


def _popen(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, str(TRAIN_PY), *args], cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, started at once and waited for when a test needs its result."""
    tmp = tmp_path_factory.mktemp("reference")
    cache = tmp_path_factory.mktemp("zca")
    run = tmp / "run"
    proc = _popen(_args(tmp, run, cache), cwd=tmp)

    class Reference:
        folder, zca = tmp, cache

        def result(self):
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            return run, out

    yield Reference()
    if proc.poll() is None:
        proc.kill()


def _assert_same_as(reference, run: Path) -> None:
    ref, out = reference.result()
    assert "estimate: 3 epochs x " in out  # the cost line of an ordinary run
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    assert a["status"] == b["status"] == "finished" and a["epochs"] == b["epochs"] == EPOCHS
    assert (a["test_error"], a["val_error"]) == (b["test_error"], b["val_error"])
    wa, wb = _weights(ref), _weights(run)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ca, cb = (read_epochs(d / "csv" / "metrics.csv") for d in (ref, run))
    ca.pop("epoch_time_s"), cb.pop("epoch_time_s")
    assert ca == cb  # every epoch's logged metrics, the interrupted epoch's train loss and accuracy included


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.system
@pytest.mark.subprocess
def test_sigterm_mid_training_saves_and_resume_matches_uninterrupted(reference, tmp_path):
    run = tmp_path / "preempted"
    victim = _popen(_args(reference.folder, run, reference.zca), cwd=tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be interrupted"
    victim.send_signal(signal.SIGTERM)  # the end of epoch 0 was just saved: now inside epoch 1
    sent = time.time()
    out, err = victim.communicate(timeout=120)
    assert victim.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert time.time() - sent < 30
    _no_traceback(err)
    line = last_line(err)
    command = f"python {TRAIN_PY} resume={run}"
    # Under load the signal can land on the boundary at the end of epoch 1 rather than inside it.
    assert line.startswith(("error: interrupted by SIGTERM at epoch ",
                            "error: interrupted by SIGTERM at the end of epoch "))
    assert line.endswith(f"continue with: {command}")
    assert f"saved {last}" in line or "during validation" in line
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] < EPOCHS * 10  # stopped mid-training

    argv = shlex.split(line.split("continue with: ")[1])
    proc = subprocess.run([PYTHON, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_as(reference, run)


INJECT = '''
import errno, os
_dir = os.environ.get("ALLCONV_TEST_FULL_AFTER_FIRST")
if _dir:
    _write = os.write
    def _full(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(_dir) and os.path.exists(os.path.join(_dir, "last.ckpt")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _write(fd, data)
    os.write = _full
'''


@pytest.mark.system
@pytest.mark.subprocess
def test_disk_full_at_second_checkpoint_then_resume_matches_uninterrupted(reference, tmp_path):
    ref, _ = reference.result()
    ckpt_size = (ref / "checkpoints" / "last.ckpt").stat().st_size
    disk = tmp_path / "disk"
    env = None
    if not _mount(disk, f"{(ckpt_size * 3 // 2) // 1024 + 96}k"):  # one checkpoint and the small files
        inject = tmp_path / "inject"
        inject.mkdir()
        (inject / "sitecustomize.py").write_text(INJECT)
        env = {"PYTHONPATH": str(inject), "ALLCONV_TEST_FULL_AFTER_FIRST": str(disk / "run" / "checkpoints")}
    try:
        run = disk / "run"
        proc = _popen(_args(reference.folder, run, reference.zca), cwd=tmp_path, env=env)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-3000:]
        _no_traceback(err)
        assert last_line(err) == f"error: cannot write {run / 'checkpoints' / 'last.ckpt'}: " \
                                 f"No space left on device (ENOSPC)"
        assert [p for p in run.rglob("*") if p.name.endswith(".tmp")] == []
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0  # the good one
        assert json.loads((run / "metrics.json").read_text())["status"] == "failed"

        if env is None:  # space is freed
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True, capture_output=True)
        proc = subprocess.run([PYTHON, str(TRAIN_PY), f"resume={run}"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        _assert_same_as(reference, run)
    finally:
        if env is None:
            _umount(disk)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
