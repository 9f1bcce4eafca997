"""Writing a run's files when the disk may be full, read-only or not ours: whole files or nothing.

write_atomic() is the one place where a run's files reach the disk (checkpoints, the whitening
cache, metrics.json, the learning curve and figures, the CSV log): the bytes go to a temporary
file in the same folder, which is flushed, fsynced and renamed over the target. A failure of any
of these steps (ENOSPC, EDQUOT, EACCES, EROFS, EIO, ...) removes the temporary file, leaves the
previous version of the target as it was, and becomes one WriteError naming the file and the
reason. Writers render to memory first, so a half-written file never has a name: torch.save's own
error for a full disk is a RuntimeError from its zip writer, not an OSError.

CSVLogger is Lightning's, with metrics.csv and hparams.yaml written through write_atomic.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import tempfile
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from allconv.errors import WriteError


def reason(e: OSError) -> str:
    """'No space left on device (ENOSPC)': the system's words and the errno name."""
    if e.errno is None:
        return str(e) or type(e).__name__
    name = errno.errorcode.get(e.errno, str(e.errno))
    return f"{e.strerror or os.strerror(e.errno)} ({name})"


def write_error(path: str | Path, e: OSError) -> WriteError:
    err = WriteError(f"cannot write {path}: {reason(e)}")
    err.errno = e.errno
    return err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write data to path as a whole (temporary file, fsync, rename); WriteError if the system refuses."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; these are ordinary files
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # a full disk may only say so here (delayed allocation)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def torch_bytes(obj) -> bytes:
    """torch.save into memory."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def figure_bytes(fig, **savefig_kwargs) -> bytes:
    """A matplotlib figure rendered into memory (format from savefig_kwargs, PNG by default)."""
    buf = io.BytesIO()
    fig.savefig(buf, **{"format": "png", **savefig_kwargs})
    return buf.getvalue()


def _read_rows(path: str) -> list[dict]:
    """The rows an earlier part of this run wrote (resume continues the same metrics.csv)."""
    try:
        with open(path, newline="") as f:
            return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    except FileNotFoundError:
        return []


class _AtomicExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, writing the whole file each time (a few rows per epoch) through write_atomic.

    A resumed run continues its metrics.csv: Lightning's writer deletes the file when it starts;
    this one keeps the earlier rows up to the step where the resumed run takes over.
    """

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir=log_dir)
        self._earlier: list[dict] | None = _read_rows(self.metrics_file_path)
        self._rows: list[dict] = []
        self._unsaved = False  # rows whose write was refused: the next save() writes them

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning's removes metrics.csv; a resumed run keeps it

    def save(self) -> None:
        if not self.metrics and not self._unsaved:
            return
        if self._earlier is not None:  # rows of the earlier part past the checkpoint are logged again
            first = min(float(m.get("step", 0)) for m in self.metrics)
            self._rows = [r for r in self._earlier if float(r.get("step", -1)) < first]
            self._earlier = None
        self._rows += self.metrics
        self.metrics, self._unsaved = [], True
        keys = self.metrics_keys = sorted(set().union(*self._rows))
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self._rows)
        write_atomic(self.metrics_file_path, buf.getvalue().encode())
        self._unsaved = False

    def log_hparams(self, params: dict) -> None:
        from omegaconf import OmegaConf

        self.hparams.update(params)
        write_atomic(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE),
                     OmegaConf.to_yaml(OmegaConf.create(dict(self.hparams))).encode())


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger whose files are written whole or not at all; a refused write is a WriteError."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AtomicExperimentWriter:
        if self._experiment is None:
            try:
                os.makedirs(self.log_dir, exist_ok=True)
            except OSError as e:
                raise write_error(self.log_dir, e) from None
            self._experiment = _AtomicExperimentWriter(log_dir=self.log_dir)
        return self._experiment

    def finalize(self, status: str) -> None:
        if status != "failed":
            return super().finalize(status)
        try:  # the run is already failing: its own error is the one to report
            super().finalize(status)
        except WriteError:
            pass
