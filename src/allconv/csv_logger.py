"""Lightning's CSVLogger, its files (csv/metrics.csv, csv/hparams.yaml) written whole through files.write_atomic.

A refused write is a WriteError naming the file; the rows it could not write are written by the
next save. A resumed run continues its metrics.csv: Lightning's writer deletes the file when it
starts; this one reads it first, writes it back at once, and keeps the rows logged before the step
where the resumed run takes over (a malformed row of the kept file is dropped with one warning line,
never a failed run). Only public Lightning names are used.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from allconv.errors import WriteError
from allconv.files import NotRegularFile, reason, write_atomic, write_error
from allconv.learning_curve import csv_lines, finite


def _read_rows(path: str) -> list[dict]:
    """The rows an earlier part of this run wrote (resume continues the same metrics.csv).

    The kept file is data: a row that is not a row of its header or holds a cell that is not a finite number
    (each cell this logger writes is one) is dropped, and so is every row of a file that cannot be read as a
    log (not a regular file, no step column): one warning line names the file and the first fault. The run goes
    on; the file is rewritten with the rows kept."""
    try:
        header, lines = csv_lines(path)
    except FileNotFoundError:
        return []
    except (OSError, NotRegularFile) as e:
        why = f"cannot be read: {reason(e)}" if isinstance(e, OSError) else str(e)
        print(f"warning: {path} {why}; its earlier rows are not kept", file=sys.stderr, flush=True)
        return []
    if header and ("step" not in header or len(set(header)) != len(header) or "" in header):
        print(f"warning: {path} is not a metrics log (its header {','.join(header)[:80]!r} names no step column "
              f"or repeats one); {len(lines)} earlier row{'s' if len(lines) != 1 else ''} not kept", file=sys.stderr,
              flush=True)
        return []
    rows, first_fault = [], ""
    for number, row in enumerate(lines, start=1):
        bad = "is not a CSV row of its header" if row is None else \
            next((f"{k}={v[:40]!r} is not a finite number" for k, v in row.items() if finite(v) is None), "")
        if bad:
            first_fault = first_fault or f"row {number}: {bad}"
        else:
            rows.append(row)
    if first_fault:
        dropped = len(lines) - len(rows)
        print(f"warning: {path}: dropped {dropped} malformed row{'s' if dropped > 1 else ''} ({first_fault}); "
              f"kept {len(rows)}", file=sys.stderr, flush=True)
    return rows


class _AtomicExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, writing the whole file each time (a few rows per epoch) through write_atomic."""

    def __init__(self, log_dir: str) -> None:
        earlier = _read_rows(os.path.join(log_dir, self.NAME_METRICS_FILE))  # Lightning's __init__ removes the file
        super().__init__(log_dir=log_dir)
        self._rows, self._resumed = earlier, bool(earlier)
        self._unsaved = bool(earlier)  # rows not on disk (put back now, or refused by a full disk)
        self.save()

    def save(self) -> None:
        if not self.metrics and not self._unsaved:
            return
        if self._resumed and self.metrics:  # rows of the earlier part past the checkpoint are logged again
            first = min(float(m.get("step", 0)) for m in self.metrics)
            self._rows = [r for r in self._rows if float(r.get("step", -1)) < first]
            self._resumed = False
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
        import yaml

        self.hparams.update(params)
        plain = json.loads(json.dumps(dict(self.hparams), default=repr))  # what YAML cannot hold, as its repr
        write_atomic(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE), yaml.safe_dump(plain).encode())


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger whose files are written whole or not at all; a refused write is a WriteError."""

    _writer: _AtomicExperimentWriter | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> _AtomicExperimentWriter:
        if self._writer is None:
            try:
                os.makedirs(self.log_dir, exist_ok=True)
            except OSError as e:
                raise write_error(self.log_dir, e) from None
            self._writer = _AtomicExperimentWriter(log_dir=self.log_dir)
        return self._writer

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._writer is None:
            return
        try:
            self.save()
        except WriteError:
            if status != "failed":
                raise  # else the run is already failing: its own error is the one to report
