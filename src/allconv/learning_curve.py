"""The learning curve of one run, as a PNG: train loss, train/val error and lr per epoch.

Reads the CSVLogger's metrics.csv (logger=csv, the default) that Lightning writes into the run
directory; train.py calls it at the end of every run, and `python -m allconv.learning_curve <run dir>`
redraws it. The file is data from a run folder: only a regular file is read, and a cell that is not
a finite number (text, NaN, a number too large for a float, a line that is not CSV) is skipped.
"""

from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

from allconv.files import figure_bytes, read_regular, write_atomic

# A metrics log holds a few rows per epoch (about 100 kB for 350 epochs); more is not one of this project's.
MAX_CSV_BYTES = 64 << 20
MAX_EPOCH = 10 ** 6  # an axis that a figure can draw; no run trains this long


def finite(cell: str) -> float | None:
    """The cell as a finite float, or None (text, NaN, inf, or a number too large for a float)."""
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def csv_lines(path: str | Path) -> tuple[list[str], list[dict[str, str] | None]]:
    """(the header, each later line's non-empty cells by column) of a CSV log; None for a line that is not a row
    of that header (not CSV, a NUL byte, more or fewer cells). Blank lines are skipped, as csv.DictReader does.

    NotRegularFile or OSError when path is not a readable regular file of at most MAX_CSV_BYTES."""
    lines = read_regular(path, MAX_CSV_BYTES).decode("utf-8", errors="replace").splitlines()

    def cells(line: str) -> list[str] | None:
        if "\0" in line:
            return None
        try:
            return next(csv.reader([line]))
        except (csv.Error, StopIteration):
            return None

    header = cells(lines[0]) if lines else None
    if not header:
        return [], []
    rows: list[dict[str, str] | None] = []
    for line in lines[1:]:
        if not line.strip():
            continue
        row = cells(line)
        fits = row is not None and len(row) == len(header)
        rows.append({k: v for k, v in zip(header, row, strict=True) if v != ""} if fits else None)
    return header, rows


def read_epochs(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """{metric: {epoch: value}} from a Lightning CSVLogger file (rows hold some metrics each).

    A row whose epoch is not a whole number in 0..MAX_EPOCH is skipped, and so is a cell that is not a finite
    number."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for row in csv_lines(metrics_csv)[1]:
        epoch = finite(row.get("epoch", "")) if row else None
        if epoch is None or not (0 <= epoch <= MAX_EPOCH and epoch.is_integer()):
            continue
        for key, cell in row.items():
            value = finite(cell)
            if key not in ("epoch", "step") and value is not None:
                series[key][int(epoch)] = value
    return series


def plot_run(metrics_csv: Path, png: Path, title: str | None = None) -> Path | None:
    """Draw a run's learning curve from its CSV log into png; None when there is no log."""
    if not metrics_csv.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = read_epochs(metrics_csv)
    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    if "train/acc" in s:
        ep = sorted(s["train/acc"])
        ax_err.plot([e + 1 for e in ep], [100 * (1 - s["train/acc"][e]) for e in ep], label="train error (dropout on)")
    if "val/error" in s:
        ep = sorted(s["val/error"])
        ax_err.plot([e + 1 for e in ep], [100 * s["val/error"][e] for e in ep], label="validation error")
    if "test/error" in s:
        (e, v), = list(s["test/error"].items())[-1:]  # logged after fit, at epoch == max_epochs
        ax_err.scatter([e], [100 * v], color="k", zorder=3, label=f"test error {100 * v:.2f}%")
    ax_err.set(xlabel="epoch", ylabel="error (%)", ylim=(0, 100))
    ax_err.grid(alpha=0.3)
    ax_err.legend()
    if "train/loss" in s:
        ep = sorted(s["train/loss"])
        ax_loss.plot([e + 1 for e in ep], [s["train/loss"][e] for e in ep], color="C3", label="train loss")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy")
    ax_loss.grid(alpha=0.3)
    if "lr" in s:
        ax_lr = ax_loss.twinx()
        ep = sorted(s["lr"])
        ax_lr.step([e + 1 for e in ep], [s["lr"][e] for e in ep], where="post", color="C7", ls="--", label="lr")
        ax_lr.set_ylabel("learning rate")
    ax_loss.legend(loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:  # rendered in memory, written whole (a full disk is a WriteError naming the file)
        return write_atomic(png, figure_bytes(fig, dpi=120))
    finally:
        plt.close(fig)


if __name__ == "__main__":
    from allconv.errors import AllConvError
    from allconv.files import NotRegularFile, reason
    from allconv.run_folder import RunFolder  # the command's layer: the drawing above takes plain paths

    try:
        for d in sys.argv[1:]:
            print(plot_run(RunFolder(d).metrics_csv, RunFolder(d).learning_curve))
    except AllConvError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (OSError, NotRegularFile) as e:  # the log was replaced after plot_run found a file there
        why = f"cannot be read: {reason(e)}" if isinstance(e, OSError) else str(e)
        print(f"error: {RunFolder(d).metrics_csv} {why}", file=sys.stderr)
        sys.exit(2)
