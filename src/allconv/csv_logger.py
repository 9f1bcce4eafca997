"""Lightning's CSVLogger, its files (csv/metrics.csv, csv/hparams.yaml) written whole through faults.write_atomic.

A refused write is a WriteError naming the file; the rows it could not write are written by the
next save. A resumed run continues its metrics.csv: Lightning's writer deletes the file when it
starts, this one keeps the rows logged before the step where the resumed run takes over.
"""

from __future__ import annotations

import csv
import io
import json
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from allconv.errors import WriteError
from allconv.faults import write_atomic, write_error


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
        import yaml

        self.hparams.update(params)
        plain = json.loads(json.dumps(dict(self.hparams), default=repr))  # what YAML cannot hold, as its repr
        write_atomic(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE), yaml.safe_dump(plain).encode())


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
