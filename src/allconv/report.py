"""Table 1 from sweep folders: python src/report.py <sweep dir> [<sweep dir> ...] [--out DIR].

Every run folder below the given folders is read: one with metrics.json status "ok" counts, one
with status "failed", no metrics.json (killed, still running) or an unreadable one is listed, not
crashed on; (model, lr, seed) cells of the grid with no folder at all are listed as missing. Per
model the learning rate is chosen on the mean validation error over seeds when every run of that
model has one, otherwise on the test error, labelled so ("selected on test, as the paper did"). The
table (report.md) and a bar chart of ours vs the paper vs the review (report.png) go to --out
(default: the first folder); the table is also printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from allconv import models
from allconv.errors import ReportError

# Test error (%) on CIFAR-10 without augmentation: the paper's Table 1 and the replication review's
# runs (PAPER.md, "Reference results"). Keys are the Hydra option names, rows in the paper's order.
REFERENCE: dict[str, tuple[float, float]] = {
    "model_a": (12.47, 15.16), "strided_cnn_a": (13.46, 18.23), "convpool_cnn_a": (10.21, 11.44),
    "all_cnn_a": (10.30, 12.47),
    "model_b": (10.20, 13.52), "strided_cnn_b": (10.98, 15.56), "convpool_cnn_b": (9.33, 11.84),
    "all_cnn_b": (9.10, 11.84),
    "model_c": (9.74, 11.11), "strided_cnn_c": (10.19, 12.91), "convpool_cnn_c": (9.31, 11.09),
    "all_cnn_c": (9.08, 11.17),
}
ORDER = [models.config_name(f, v) for f, v in models.all_networks()]
ON_TEST = "selected on test, as the paper did"


@dataclass
class Run:
    path: Path
    status: str                      # ok | failed | incomplete | unreadable
    model: str | None = None
    lr: float | None = None
    seed: int | None = None
    metrics: dict = field(default_factory=dict)
    error: str = ""


def _from_saved_overrides(run_dir: Path) -> dict:
    """model, lr and seed of a run with no usable metrics.json, from Hydra's saved overrides."""
    out = {}
    try:
        lines = (run_dir / ".hydra" / "overrides.yaml").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.lstrip("- ").partition("=")
        try:
            if key == "model":
                out["model"] = value
            elif key == "optim.lr":
                out["lr"] = float(value)
            elif key == "seed":
                out["seed"] = int(value)
        except ValueError:
            pass
    return out


def read_run(run_dir: Path) -> Run:
    path = run_dir / "metrics.json"
    if not path.is_file():
        saved = _from_saved_overrides(run_dir)
        return Run(run_dir, "incomplete", saved.get("model"), saved.get("lr"), saved.get("seed", 0),
                   error="no metrics.json (killed or still running; resume with `python src/train.py resume=DIR`)")
    try:
        m = json.loads(path.read_text())
        status = m.get("status", "ok")
        run = Run(run_dir, status if status in ("ok", "failed") else "failed", m.get("model"),
                  float(m["lr"]) if m.get("lr") is not None else None, int(m.get("seed", 0)), m, m.get("error", ""))
        if run.status == "ok" and not isinstance(m.get("test_error"), (int, float)):
            run.status, run.error = "unreadable", "metrics.json has no test_error"
        return run
    except (OSError, ValueError, TypeError, AttributeError) as e:
        saved = _from_saved_overrides(run_dir)
        return Run(run_dir, "unreadable", saved.get("model"), saved.get("lr"), saved.get("seed", 0),
                   error=f"metrics.json unreadable ({type(e).__name__})")


def find_runs(dirs: list[Path]) -> list[Run]:
    """Run folders under dirs: any folder with a metrics.json or a Hydra .hydra/ folder (not a sweep's root)."""
    runs, seen = [], set()
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"{d}: no such directory")
        candidates = {p.parent for p in d.rglob("metrics.json")}
        candidates |= {p.parent.parent for p in d.rglob(".hydra/overrides.yaml")}
        for run_dir in sorted(candidates):
            key = run_dir.resolve()
            if key in seen or (run_dir / "multirun.yaml").is_file():
                continue
            seen.add(key)
            runs.append(read_run(run_dir))
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass
class Row:
    model: str
    name: str                        # the paper's name, e.g. All-CNN-C
    lr: float
    seeds: list[int]
    test: tuple[float, float]        # mean, std in %
    selected_on: str
    params: int | None
    wall_s: float | None
    n_lrs: int


def summarise(runs: list[Run]) -> tuple[list[Row], list[Run], list[tuple[str, float, int]]]:
    """(one row per model, the runs that did not finish, the (model, lr, seed) cells with no folder)."""
    ok = [r for r in runs if r.status == "ok" and r.model and r.lr is not None]
    bad = [r for r in runs if r not in ok]
    by_model: dict[str, dict[float, list[Run]]] = {}
    for r in ok:
        by_model.setdefault(r.model, {}).setdefault(r.lr, []).append(r)
    rows = []
    for model in sorted(by_model, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m)):
        cells = by_model[model]
        on_val = all("val_error" in r.metrics for rs in cells.values() for r in rs)
        key = "val_error" if on_val else "test_error"
        lr = min(cells, key=lambda lr: (statistics.fmean(r.metrics[key] for r in cells[lr]), lr))
        chosen = sorted(cells[lr], key=lambda r: r.seed)
        mean, std = _mean_std([100 * r.metrics["test_error"] for r in chosen])
        walls = [r.metrics["wall_time_s"] for r in chosen if isinstance(r.metrics.get("wall_time_s"), (int, float))]
        rows.append(Row(model, chosen[0].metrics.get("network", model), lr, [r.seed for r in chosen], (mean, std),
                        "validation" if on_val else ON_TEST,
                        chosen[0].metrics.get("params"), statistics.fmean(walls) if walls else None, len(cells)))
    present = {(r.model, r.lr, r.seed) for r in runs}
    grid_models = sorted({r.model for r in runs if r.model}, key=lambda m: ORDER.index(m) if m in ORDER else 99)
    lrs = sorted({r.lr for r in runs if r.lr is not None}, reverse=True)
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    missing = [(m, lr, s) for m in grid_models for lr in lrs for s in seeds if (m, lr, s) not in present]
    return rows, bad, missing


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _settings(runs: list[Run]) -> str:
    ok = [r.metrics for r in runs if r.status == "ok"]
    parts = []
    for key in ("data", "width", "epochs", "augment", "batch_size"):
        values = sorted({str(m.get(key)) for m in ok if key in m})
        if values:
            parts.append(f"{key}={'/'.join(values)}")
    return ", ".join(parts)


def markdown(rows: list[Row], bad: list[Run], missing: list, runs: list[Run]) -> str:
    lines = ["# All-CNN reproduction: test error on the paper's grid", "",
             f"{len(runs)} run folders: {sum(r.status == 'ok' for r in runs)} finished, "
             f"{len(bad)} failed or incomplete, {len(missing)} grid cells missing. Settings: {_settings(runs)}.", "",
             "Paper: CIFAR-10, no augmentation, width 1, 350 epochs; the paper's and the review's errors are "
             "those of PAPER.md.", "",
             "| model | chosen lr | lr selected on | seeds | test error % (mean ± std) | paper % | review % "
             "| params | wall time / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper, review = REFERENCE.get(r.model, (None, None))
        params = f"{r.params:,}" if isinstance(r.params, int) else "–"
        lines.append(f"| {r.name} | {r.lr:g} (of {r.n_lrs}) | {r.selected_on} | {', '.join(map(str, r.seeds))} "
                     f"| {r.test[0]:.2f}{f' ± {r.test[1]:.2f}' if len(r.seeds) > 1 else ''} "
                     f"| {_pct(paper)} | {_pct(review)} | {params} "
                     f"| {_fmt_time(r.wall_s)} |")
    if bad:
        lines += ["", "## Failed or incomplete runs", "", "| run | model | lr | seed | status | reason |",
                  "|---|---|---|---|---|---|"]
        for r in bad:
            reason = (r.error or "").replace("|", "/").splitlines()[0] if r.error else ""
            lines.append(f"| {r.path} | {r.model or '?'} | {_g(r.lr)} | {_g(r.seed)} | {r.status} | {reason} |")
    if missing:
        lines += ["", "## Missing grid cells (no run folder)", ""]
        lines += [f"- {m}, lr {lr:g}, seed {s}" for m, lr, s in missing]
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _g(x) -> str:
    return "?" if x is None else f"{x:g}"


def bar_chart(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [r.model for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5))
    ax.bar(x - 0.27, [r.test[0] for r in rows], 0.27, yerr=[r.test[1] for r in rows], capsize=3, label="ours")
    ax.bar(x, [REFERENCE.get(m, (np.nan,) * 2)[0] for m in labels], 0.27, label="paper")
    ax.bar(x + 0.27, [REFERENCE.get(m, (np.nan,) * 2)[1] for m in labels], 0.27, label="review")
    ax.set_xticks(x, labels, rotation=35, ha="right")
    ax.set_ylabel("test error (%)")
    ax.set_title("CIFAR-10 test error: ours vs the paper vs the review")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(dirs: list[Path], out: Path | None = None, plot: bool = True) -> tuple[str, Path]:
    runs = find_runs(dirs)
    if not runs:
        raise ReportError(f"no runs under {', '.join(map(str, dirs))} (no metrics.json or .hydra/ run folders)")
    rows, bad, missing = summarise(runs)
    text = markdown(rows, bad, missing, runs)
    out = out or dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    if plot and rows:
        bar_chart(rows, out / "report.png")
    return text, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Markdown table + bar chart of sweep results vs the paper.")
    ap.add_argument("dirs", nargs="+", type=Path, help="sweep or run folders (searched recursively)")
    ap.add_argument("--out", type=Path, default=None, help="where report.md and report.png go (default: first dir)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = ap.parse_args(argv)
    try:
        text, out = report(args.dirs, args.out, plot=not args.no_plot)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"-> {out / 'report.md'}" + ("" if args.no_plot else f", {out / 'report.png'}"), file=sys.stderr)
    return 0
