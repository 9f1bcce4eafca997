"""The learning curve of one run, as a PNG: train loss, train/val error and lr per epoch.

Reads the CSVLogger's metrics.csv (logger=csv, the default) that Lightning writes into the run
directory; train.py calls it at the end of every run, and `python -m allconv.curves <run dir>`
redraws it.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

from allconv.faults import figure_bytes, write_atomic


def read_epochs(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """{metric: {epoch: value}} from a Lightning CSVLogger file (rows hold some metrics each)."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for key, value in row.items():
                if key not in ("epoch", "step") and value not in ("", None):
                    series[key][epoch] = float(value)
    return series


def plot_run(run_dir: str | Path, title: str | None = None) -> Path | None:
    """Write <run_dir>/learning_curve.png; None when the run has no CSV metrics."""
    run_dir = Path(run_dir)
    metrics_csv = run_dir / "csv" / "metrics.csv"
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
        return write_atomic(run_dir / "learning_curve.png", figure_bytes(fig, dpi=120))
    finally:
        plt.close(fig)


if __name__ == "__main__":
    from allconv.errors import AllConvError

    try:
        for d in sys.argv[1:]:
            print(plot_run(d))
    except AllConvError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
