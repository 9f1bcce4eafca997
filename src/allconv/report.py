"""Sweep folders to tables and figures: python src/report.py <sweep dir> [...] [--curves] [--out DIR].

Every run folder below the given folders is read: one with metrics.json status "ok" counts, one
with status "failed", no metrics.json (killed, still running) or an unreadable one is listed, not
crashed on. A run's settings come from its metrics.json and its Hydra .hydra/config.yaml, so runs
that share model and lr but not the update cap (optim.max_update_norm) stay apart.

Table 1 mode (the default): per model the learning rate is chosen on the mean validation error over
seeds when every run of that model has one, otherwise on the test error, labelled so ("selected on
test, as the paper did"); (model, lr, seed) cells of the grid with no folder are listed as missing.
The table (report.md) and a bar chart of ours vs the paper vs the review (report.png) go to --out
(default: the first folder).

--curves: one row per run (final and best validation error, test error, wall time, whether it
trained to the end or died and when) and the learning curves of all runs in one figure (curves.md,
curves.png). A run died at epoch k when from epoch k to its last logged epoch every epoch is at
chance: train loss >= ln(num_classes) - 0.02 and train accuracy <= 1/num_classes + 0.02.

Both modes state in the page and in the figure how the runs differ from the paper's setting
(width 1, 350 epochs, CIFAR-10, no augmentation). --md / --png choose other file names; text below
KEEP_MARKER in an existing page is kept when the page is rewritten.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from allconv import models
from allconv.curves import read_epochs
from allconv.errors import ReportError, WriteError
from allconv.faults import figure_bytes, write_atomic

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
# The paper's training setting; a setting missing from a run's files is not compared.
PAPER = {"width": 1.0, "epochs": 350, "data": "CIFAR-10", "preprocess": "gcn_zca", "augment": False,
         "held_out": 0, "cap": None}
PAPER_TEXT = "width 1, 350 epochs, CIFAR-10, no augmentation"
# At chance: a network whose ReLUs are all dead predicts the class prior whatever the input.
CHANCE_LOSS_TOL = 0.02
CHANCE_ACC_TOL = 0.02
KEEP_MARKER = "<!-- Text below this line is written by hand; src/report.py keeps it when it rewrites the page. -->"


@dataclass
class Run:
    path: Path
    status: str                      # ok | failed | incomplete | unreadable
    model: str | None = None
    lr: float | None = None
    seed: int | None = None
    metrics: dict = field(default_factory=dict)
    error: str = ""
    config: dict = field(default_factory=dict)   # .hydra/config.yaml, {} when absent

    @property
    def network(self) -> str:
        """The paper's name (All-CNN-C), from metrics.json or the saved config, else the model option."""
        m = self.config.get("model") or {}
        if self.metrics.get("network"):
            return self.metrics["network"]
        if m.get("variant") in models.NAMES and isinstance(m.get("family"), str):
            return models.paper_name(m["family"], m["variant"])
        return self.model or "?"

    @property
    def cap(self) -> float | None:
        """optim.max_update_norm (saved config, else metrics.json); None for plain SGD or when not recorded."""
        optim = self.config.get("optim")
        return optim.get("max_update_norm") if isinstance(optim, dict) else self.metrics.get("max_update_norm")


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


def _saved_config(run_dir: Path) -> dict:
    try:
        cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _read_run(run_dir: Path) -> Run:
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


def read_run(run_dir: Path) -> Run:
    run = _read_run(run_dir)
    run.config = c = _saved_config(run_dir)
    model, optim = c.get("model") or {}, c.get("optim") or {}
    try:  # a run killed before metrics.json: what its saved config says
        if run.model is None and model.get("family") and model.get("variant"):
            run.model = models.config_name(model["family"], model["variant"])
        if run.lr is None and isinstance(optim.get("lr"), (int, float)):
            run.lr = float(optim["lr"])
    except (KeyError, AttributeError):
        pass
    return run


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


# --- what was run, in words -------------------------------------------------------------------

def data_label(source, path=None) -> str:
    if source == "cifar10":
        return "CIFAR-10"
    if source == "cifar100":
        return "CIFAR-100"
    if source == "npz":
        name = Path(str(path)).name if path else ""
        if "jpeg" in name.lower():  # the arrays file `make data-jpeg` decodes from the JPEG copy
            return f"JPEG copy of CIFAR-10 ({name})"
        return f"arrays file {name}".rstrip()
    return str(source)


def run_settings(run: Run) -> dict:
    """The settings of PAPER that the run's files record (config.yaml first, else metrics.json)."""
    m, c = run.metrics, run.config
    model, data, trainer, optim = (c.get(k) or {} for k in ("model", "data", "trainer", "optim"))
    found = {
        "width": model.get("width", m.get("width")),
        "epochs": trainer.get("max_epochs", m.get("epochs")),
        "data": data_label(data.get("source", m.get("data")), data.get("path")) if (data or "data" in m) else None,
        "preprocess": data.get("preprocess", m.get("preprocess")),
        "augment": data.get("augment", m.get("augment")),
        "held_out": (data.get("val_size") or 0) if data else None,
    }
    out = {k: v for k, v in found.items() if v is not None}
    if optim or "max_update_norm" in m:
        out["cap"] = run.cap
    return out


def _phrase(key: str, values: list) -> str:
    if key == "width":
        return "width " + "/".join(f"{v:g}" for v in values)
    if key == "epochs":
        return "/".join(f"{v:g}" for v in values) + (" epoch" if values == [1] else " epochs")
    if key == "augment":
        return "augmentation (flips, translations)" if values == [True] else "augmentation on some runs"
    if key == "preprocess":
        return "preprocessing " + "/".join(map(str, values))
    if key == "held_out":
        return "/".join(f"{v:,}" for v in values) + " training images held out for validation"
    if key == "cap":
        return "update cap " + " or ".join("none" if v is None else f"{v:g}" for v in values)
    return "/".join(map(str, values))


def settings_label(runs: list[Run]) -> str:
    """One sentence: how the runs differ from the paper's setting, or that they do not."""
    settings = [run_settings(r) for r in runs]
    phrases = []
    for key, paper in PAPER.items():
        values = []
        for s in settings:
            if key in s and s[key] not in values:
                values.append(s[key])
        if values and values != [paper]:
            values.sort(key=lambda v: (v is None, v if not isinstance(v, str) else 0, str(v)))
            phrases.append(_phrase(key, values))
    if not phrases:
        return f"The paper's setting ({PAPER_TEXT})."
    return f"Not the paper's setting: {', '.join(phrases)} (the paper: {PAPER_TEXT})."


def _cap_text(cap: float | None) -> str:
    return "no cap" if cap is None else f"cap {cap:g}"


# --- Table 1 ----------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass
class Row:
    model: str
    name: str                        # the paper's name, e.g. All-CNN-C
    lr: float
    cap: float | None
    seeds: list[int]
    test: tuple[float, float]        # mean, std in %
    selected_on: str
    params: int | None
    wall_s: float | None
    n_lrs: int                       # settings (lr, cap) tried for this model


def summarise(runs: list[Run]) -> tuple[list[Row], list[Run], list[tuple[str, float, int]]]:
    """(one row per model, the runs that did not finish, the (model, lr, seed) cells with no folder)."""
    ok = [r for r in runs if r.status == "ok" and r.model and r.lr is not None]
    bad = [r for r in runs if r not in ok]
    by_model: dict[str, dict[tuple, list[Run]]] = {}
    for r in ok:
        by_model.setdefault(r.model, {}).setdefault((r.lr, r.cap), []).append(r)
    rows = []
    for model in sorted(by_model, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m)):
        cells = by_model[model]
        on_val = all("val_error" in r.metrics for rs in cells.values() for r in rs)
        key = "val_error" if on_val else "test_error"
        best = min(cells, key=lambda s: (statistics.fmean(r.metrics[key] for r in cells[s]), s[0],
                                         s[1] is None, s[1] or 0))
        chosen = sorted(cells[best], key=lambda r: r.seed)
        mean, std = _mean_std([100 * r.metrics["test_error"] for r in chosen])
        walls = [r.metrics["wall_time_s"] for r in chosen if isinstance(r.metrics.get("wall_time_s"), (int, float))]
        rows.append(Row(model, chosen[0].metrics.get("network", model), best[0], best[1], [r.seed for r in chosen],
                        (mean, std), "validation" if on_val else ON_TEST, chosen[0].metrics.get("params"),
                        statistics.fmean(walls) if walls else None, len(cells)))
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


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _g(x) -> str:
    return "?" if x is None else f"{x:g}"


def markdown(rows: list[Row], bad: list[Run], missing: list, runs: list[Run]) -> str:
    show_cap = len({r.cap for r in runs}) > 1  # else the cap is in the settings line
    lines = ["# All-CNN reproduction: test error on the paper's grid", "",
             f"**{settings_label(runs)}** The paper's and the review's errors are those of PAPER.md.", "",
             f"{len(runs)} run folders: {sum(r.status == 'ok' for r in runs)} finished, "
             f"{len(bad)} failed or incomplete, {len(missing)} grid cells missing.", "",
             "| model | chosen lr | lr selected on | seeds | test error % (mean ± std) | paper % | review % "
             "| params | wall time / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper, review = REFERENCE.get(r.model, (None, None))
        params = f"{r.params:,}" if isinstance(r.params, int) else "–"
        cap = f", {_cap_text(r.cap)}" if show_cap else ""
        lines.append(f"| {r.name} | {r.lr:g}{cap} (of {r.n_lrs}) | {r.selected_on} | {', '.join(map(str, r.seeds))} "
                     f"| {r.test[0]:.2f}{f' ± {r.test[1]:.2f}' if len(r.seeds) > 1 else ''} "
                     f"| {_pct(paper)} | {_pct(review)} | {params} "
                     f"| {_fmt_time(r.wall_s)} |")
    if bad:
        lines += ["", "## Failed or incomplete runs", "", "| run | model | lr | seed | status | reason |",
                  "|---|---|---|---|---|---|"]
        for r in bad:
            reason = (r.error or "").replace("|", "/").splitlines()[0] if r.error else ""
            cap = f", {_cap_text(r.cap)}" if show_cap else ""
            lines.append(f"| {r.path} | {r.model or '?'} | {_g(r.lr)}{cap} | {_g(r.seed)} | {r.status} | {reason} |")
    if missing:
        lines += ["", "## Missing grid cells (no run folder)", ""]
        lines += [f"- {m}, lr {lr:g}, seed {s}" for m, lr, s in missing]
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int = 110) -> str:
    return "\n".join(textwrap.wrap(text, width))


def bar_figure(rows: list[Row], label: str):
    """Ours vs the paper vs the review per model; label (settings_label) is the figure's subtitle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [r.model for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(rows) + 2), 5.0), layout="constrained")
    ax.bar(x - 0.27, [r.test[0] for r in rows], 0.27, yerr=[r.test[1] for r in rows], capsize=3, label="ours")
    ax.bar(x, [REFERENCE.get(m, (np.nan,) * 2)[0] for m in labels], 0.27, label="paper")
    ax.bar(x + 0.27, [REFERENCE.get(m, (np.nan,) * 2)[1] for m in labels], 0.27, label="review")
    ax.set_xticks(x, labels, rotation=35, ha="right")
    ax.set_ylabel("test error (%)")
    ax.set_title(_wrap(f"ours: {label[0].lower()}{label[1:]}", 80), fontsize=9)
    fig.suptitle("Test error: ours vs the paper (Table 1) vs the review")
    ax.legend()
    return fig


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        write_atomic(path, figure_bytes(fig, dpi=120))  # whole or not at all; WriteError names the file
    finally:
        plt.close(fig)


def report(dirs: list[Path], out: Path | None = None, plot: bool = True, md: Path | None = None,
           png: Path | None = None) -> tuple[str, Path]:
    runs = _runs_or_error(dirs)
    rows, bad, missing = summarise(runs)
    text = markdown(rows, bad, missing, runs)
    md = _writable(md or (out or dirs[0]) / "report.md")
    png = _writable(png or (out or dirs[0]) / "report.png")
    text = _write_page(md, text)
    if plot and rows:
        _save(bar_figure(rows, settings_label(runs)), png)
    return text, md.parent


def _runs_or_error(dirs: list[Path]) -> list[Run]:
    runs = find_runs(dirs)
    if not runs:
        raise ReportError(f"no runs under {', '.join(map(str, dirs))} (no metrics.json or .hydra/ run folders)")
    return runs


def _writable(path: Path) -> Path:
    if path.is_dir():
        raise ReportError(f"{path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"{path.parent}: cannot create ({e.strerror})") from None
    return path


def _write_page(path: Path, text: str) -> str:
    """Write text to path, keeping whatever an existing page has below KEEP_MARKER."""
    _writable(path)
    try:
        old = path.read_text() if path.is_file() else ""
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read the page to keep its hand-written part ({e})") from None
    if KEEP_MARKER in old:
        text = text.split(KEEP_MARKER, 1)[0].rstrip("\n") + "\n\n" + KEEP_MARKER + old.split(KEEP_MARKER, 1)[1]
    write_atomic(path, text.encode())
    return text


# --- learning curves: one row and one line per run --------------------------------------------

@dataclass
class Trace:
    run: Run
    series: dict                     # {metric: {epoch (0-based): value}} from csv/metrics.csv
    num_classes: int
    died_at: int | None              # 1-based epoch from which the run stayed at chance
    learned: bool                    # left chance before dying (False: at chance from epoch 1)

    @property
    def epochs(self) -> int:
        return len(self.series.get("train/loss", {}))

    def fate(self) -> str:
        r = self.run
        died = None
        if self.died_at is not None:
            died = f"died at epoch {self.died_at}" if self.learned else "never left chance"
        if r.status == "ok":
            return died or f"trained to the end ({self.epochs} epochs)"
        reason = {"failed": f"failed ({(r.error or '').replace('|', '/').splitlines()[0] if r.error else '?'})",
                  "incomplete": "no metrics.json (killed or still running)",
                  "unreadable": "metrics.json unreadable"}.get(r.status, r.status)
        return f"{reason} after {self.epochs} epochs" + (f"; {died}" if died else "")


def died_at(series: dict, num_classes: int) -> tuple[int | None, bool]:
    """(first 1-based epoch of the stretch at chance that lasts to the last epoch, whether any epoch before it
    was not at chance); (None, True) when the last epoch is not at chance or there is no train loss/accuracy."""
    loss, acc = series.get("train/loss", {}), series.get("train/acc", {})
    epochs = sorted(set(loss) & set(acc))
    chance = [loss[e] >= math.log(num_classes) - CHANCE_LOSS_TOL and acc[e] <= 1 / num_classes + CHANCE_ACC_TOL
              for e in epochs]
    if not chance or not chance[-1]:
        return None, True
    i = len(chance)
    while i > 0 and chance[i - 1]:
        i -= 1
    return epochs[i] + 1, i > 0


def trace(run: Run) -> Trace:
    try:
        series = read_epochs(run.path / "csv" / "metrics.csv")
    except (OSError, ValueError, csv.Error):
        series = {}
    num_classes = int((run.config.get("data") or {}).get("num_classes") or 10)
    return Trace(run, series, num_classes, *died_at(series, num_classes))


def _order(t: Trace):
    r = t.run
    return (ORDER.index(r.model) if r.model in ORDER else len(ORDER), str(r.model), -(r.lr or 0),
            r.cap is None, r.cap or 0, r.seed or 0, str(r.path))


def _line_labels(traces: list[Trace]) -> list[str]:
    """What tells the runs apart: lr and cap always, the network and the seed when they vary."""
    many_models = len({t.run.model for t in traces}) > 1
    many_seeds = len({t.run.seed for t in traces}) > 1
    labels = []
    for t in traces:
        r = t.run
        parts = ([r.network] if many_models else []) + \
            [f"lr {_g(r.lr)}", _cap_text(r.cap)] + ([f"seed {r.seed}"] if many_seeds else [])
        labels.append(", ".join(parts))
    return labels


def lr_drops(traces: list[Trace]) -> list[tuple[int, float]]:
    """(epochs completed before the lr fell, factor) from the logged lr of every run."""
    drops = {}
    for t in traces:
        lr = t.series.get("lr", {})
        for e in sorted(lr):
            if e - 1 in lr and 0 < lr[e] < lr[e - 1]:
                drops.setdefault(e, lr[e] / lr[e - 1])
    return sorted(drops.items())


def _networks(traces: list[Trace]) -> str:
    return " / ".join(dict.fromkeys(t.run.network for t in traces))


def curves_figure(traces: list[Trace], label: str):
    """Validation error and train loss per epoch, one line per run, lr drops and chance marked;
    label (settings_label) is the figure's subtitle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_val, ax_loss) = plt.subplots(1, 2, figsize=(12, 5.2), layout="constrained")
    for i, (t, name) in enumerate(zip(traces, _line_labels(traces), strict=True)):
        color = f"C{i % 10}"
        if t.died_at is not None:
            name += f" — died at epoch {t.died_at}" if t.learned else " — never left chance"
        elif t.run.status != "ok":
            name += f" — {t.run.status}"
        val, loss = t.series.get("val/error", {}), t.series.get("train/loss", {})
        ax_val.plot([e + 1 for e in sorted(val)], [100 * val[e] for e in sorted(val)], color=color, marker=".",
                    label=name)
        ax_loss.plot([e + 1 for e in sorted(loss)], [loss[e] for e in sorted(loss)], color=color, marker=".",
                     label=name)
        if t.died_at is not None and t.died_at - 1 in val:
            ax_val.plot([t.died_at], [100 * val[t.died_at - 1]], color=color, marker="x", ms=11, mew=2.5)
    num_classes = traces[0].num_classes if traces else 10
    ax_val.axhline(100 * (1 - 1 / num_classes), color="0.4", lw=0.8, ls="--")
    ax_val.annotate("chance", (1, 100 * (1 - 1 / num_classes)), xytext=(2, 2), textcoords="offset points",
                    fontsize=8, color="0.3")
    ax_loss.axhline(math.log(num_classes), color="0.4", lw=0.8, ls="--")
    ax_loss.annotate(f"chance: ln {num_classes}", (1, math.log(num_classes)), xytext=(2, 2),
                     textcoords="offset points", fontsize=8, color="0.3")
    for ax in (ax_val, ax_loss):
        for epoch, factor in lr_drops(traces):
            ax.axvline(epoch, color="0.6", ls=":", lw=1)
            ax.annotate(f"lr ×{factor:.2g}", (epoch, 0), xycoords=("data", "axes fraction"), xytext=(2, 4),
                        textcoords="offset points", fontsize=8, color="0.3", rotation=90, va="bottom")
        ax.set_xlabel("epochs completed")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_val.set(ylabel="validation error (%)", ylim=(0, 100), title="validation error per epoch")
    top = max([math.log(num_classes)] + [v for t in traces for v in t.series.get("train/loss", {}).values()
                                         if math.isfinite(v)])
    ax_loss.set(ylabel="train cross-entropy (dropout on)", ylim=(0, 1.1 * top), title="train loss per epoch")
    ax_val.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"{_networks(traces)}: learning curves by learning rate and update cap\n{_wrap(label, 120)}",
                 fontsize=10)
    return fig


def _final(series: dict, key: str) -> float | None:
    s = series.get(key, {})
    return s[max(s)] if s else None


def _best(series: dict, key: str) -> tuple[float, int] | None:
    s = series.get(key, {})
    if not s:
        return None
    e = min(s, key=lambda e: (s[e], e))
    return s[e], e + 1


def _pc(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def runs_table(traces: list[Trace]) -> list[str]:
    lines = ["| run | network | lr | update cap | epochs | val error % (last) | val error % (best, epoch) "
             "| test error % | train loss (last) | steps capped % (at the first lr) | outcome "
             "| epoch s (fastest, median) | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in traces:
        r, s = t.run, t.series
        best = _best(s, "val/error")
        loss = _final(s, "train/loss")
        test = r.metrics.get("test_error") if r.status == "ok" else None
        wall = r.metrics.get("wall_time_s") if isinstance(r.metrics.get("wall_time_s"), (int, float)) else None
        lines.append(f"| {r.path.name} | {r.network} | {_g(r.lr)} "
                     f"| {'none' if r.cap is None else f'{r.cap:g}'} | {t.epochs} | {_pc(_final(s, 'val/error'))} "
                     f"| {'–' if best is None else f'{100 * best[0]:.2f} ({best[1]})'} | {_pc(test)} "
                     f"| {'–' if loss is None else f'{loss:.3f}'} "
                     f"| {_pc0(_capped_at_first_lr(s))} "
                     f"| {t.fate()} | {_epoch_times(s)} | {_fmt_time(wall)} |")
    return lines


def _epoch_times(series: dict) -> str:
    """Fastest and median epoch: on a shared machine the fastest is the closest to the run's own speed."""
    times = list(series.get("epoch_time_s", {}).values())
    return f"{min(times):.1f}, {statistics.median(times):.1f}" if times else "–"


def _who(t: Trace) -> str:
    return f"lr {_g(t.run.lr)} ({_cap_text(t.run.cap)})"


def findings(traces: list[Trace]) -> list[str]:
    """Sentences drawn from the numbers: which runs train to the end, which die and when, what the cap does."""
    out = []
    trained = [t for t in traces if t.run.status == "ok" and t.died_at is None]
    if trained:
        out.append(f"Trained to the end: {', '.join(_who(t) for t in trained)}.")
        ranked = [t for t in trained if _final(t.series, "val/error") is not None]
        if ranked:
            best = min(ranked, key=lambda t: _final(t.series, "val/error"))
            out.append(f"Lowest final validation error: {_who(best)}, {_pc(_final(best.series, 'val/error'))}% "
                       f"(test error {_pc(best.run.metrics.get('test_error'))}%).")
    if traces and all(t.died_at is None for t in traces):
        out.append("No run died: none ended at chance by the rule above.")
    for t in traces:
        if t.died_at is None:
            continue
        s = t.series
        when = f"died at epoch {t.died_at}" if t.learned else "never left chance"
        pre = ""
        if t.learned and t.died_at - 2 in s.get("val/error", {}):
            pre = f" after reaching {_pc(s['val/error'][t.died_at - 2])}% validation error at epoch {t.died_at - 1}"
        out.append(f"{_who(t)} {when}{pre}: at chance from then on (last epoch: train loss "
                   f"{_final(s, 'train/loss'):.3f}, ln {t.num_classes} = {math.log(t.num_classes):.3f}; train accuracy "
                   f"{100 * _final(s, 'train/acc'):.1f}%); test error {_pc(t.run.metrics.get('test_error'))}%.")
    for t in traces:
        if t.run.status != "ok":
            out.append(f"{_who(t)}: {t.fate()}.")
    out += _cap_pairs(traces)
    return out


def _capped_at_first_lr(series: dict) -> float | None:
    """Share of the steps the cap bound before the first lr drop (after it, lr*|g| is rarely that large);
    epochs have equal step counts, so the mean of the per-epoch shares."""
    f, lr = series.get("optim/clipped_frac", {}), series.get("lr", {})
    if not f:
        return None
    first = lr[min(lr)] if lr else None
    at_first = [v for e, v in f.items() if first is None or math.isclose(lr.get(e, -1.0), first)]
    return statistics.fmean(at_first or f.values())


def _pc0(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}"


def _clipped(t: Trace) -> str:
    f = t.series.get("optim/clipped_frac", {})
    if not f:
        return ""
    return (f"; the cap bound {_pc0(f[min(f)])}% of the steps of epoch 1 and {_pc0(_capped_at_first_lr(t.series))}% "
            f"of the steps before the first lr drop")


def _cap_pairs(traces: list[Trace]) -> list[str]:
    """A sentence per group of runs that differ only in the update cap."""
    groups: dict[tuple, list[Trace]] = {}
    for t in traces:
        s = run_settings(t.run)
        s.pop("cap", None)
        groups.setdefault((t.run.model, t.run.lr, t.run.seed, tuple(sorted(s.items()))), []).append(t)
    out = []
    for (_, lr, _, _), group in groups.items():
        capped = [t for t in group if t.run.cap is not None and t.run.status == "ok"]
        plain = [t for t in group if t.run.cap is None and t.run.status == "ok"]
        if not capped or not plain:
            continue
        p = plain[0]
        for c in capped:
            dt = 100 * (c.run.metrics["test_error"] - p.run.metrics["test_error"])
            verdict = (f"the cap costs {dt:.2f} points of test error" if dt > 0 else
                       f"the cap gains {-dt:.2f} points of test error" if dt < 0 else "the cap changes nothing")
            cm, pm = c.run.metrics, p.run.metrics
            out.append(f"At lr {lr:g}, {_cap_text(c.run.cap)} vs no cap: test error {_pc(cm['test_error'])}% "
                       f"vs {_pc(pm['test_error'])}%, final validation error "
                       f"{_pc(_final(c.series, 'val/error'))}% vs {_pc(_final(p.series, 'val/error'))}%, epoch time "
                       f"(fastest, median) {_epoch_times(c.series)} s vs {_epoch_times(p.series)} s: "
                       f"{verdict} (one seed each){_clipped(c)}.")
    return out


def curves_page(traces: list[Trace], label: str, command: str, png_link: str | None) -> str:
    devices = sorted({f"{t.run.metrics['device']} ({t.run.metrics.get('precision', '?')})" for t in traces
                      if t.run.metrics.get("device")})
    lines = [f"# {_networks(traces)}: learning rate and update cap", "", f"**{label}**", "",
             f"Generated by `{command}` from {len(traces)} run folders "
             f"({sum(t.run.status == 'ok' for t in traces)} finished); device (precision) the runs recorded: "
             f"{', '.join(devices) or 'not recorded'}.", ""]
    if png_link:
        lines += [f"![learning curves]({png_link})", ""]
    lines += runs_table(traces)
    lines += ["", "A run *died at epoch k* when from epoch k to its last epoch every epoch is at chance: train loss "
              f">= ln(classes) − {CHANCE_LOSS_TOL} and train accuracy <= 1/classes + {CHANCE_ACC_TOL} (dead ReLUs: the "
              "network predicts the class prior whatever the input). Epochs count from 1; the lr falls after the "
              "epochs marked in the figure.", "", "## What the runs show", ""]
    lines += [f"- {s}" for s in findings(traces)]
    return "\n".join(lines) + "\n\n" + KEEP_MARKER + "\n"


def curves_report(dirs: list[Path], out: Path | None = None, plot: bool = True, md: Path | None = None,
                  png: Path | None = None) -> tuple[str, Path]:
    runs = _runs_or_error(dirs)
    traces = sorted((trace(r) for r in runs), key=_order)
    if not any(t.series for t in traces):
        raise ReportError(f"no run under {', '.join(map(str, dirs))} has a readable csv/metrics.csv "
                          "(learning curves need logger=csv)")
    md = _writable(md or (out or dirs[0]) / "curves.md")
    png = _writable(png or (out or dirs[0]) / "curves.png")
    label = settings_label(runs)
    link = Path(os.path.relpath(png.resolve(), md.resolve().parent)).as_posix() if plot else None
    command = " ".join(["python src/report.py", *map(str, dirs), "--curves", f"--md {md}",
                        f"--png {png}" if plot else "--no-plot"])
    text = curves_page(traces, label, command, link)
    if plot:
        _save(curves_figure(traces, label), png)
    return _write_page(md, text), md.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Markdown table + figure of sweep results: Table 1 vs the paper, "
                                             "or (--curves) one row and one learning curve per run.")
    ap.add_argument("dirs", nargs="+", type=Path, help="sweep or run folders (searched recursively)")
    ap.add_argument("--curves", action="store_true",
                    help="one row per run (outcome: trained to the end / died at epoch k) and the learning curves")
    ap.add_argument("--out", type=Path, default=None, help="folder for the page and figure (default: first dir)")
    ap.add_argument("--md", type=Path, default=None, help="the page (default: <out>/report.md or curves.md)")
    ap.add_argument("--png", type=Path, default=None, help="the figure (default: <out>/report.png or curves.png)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = ap.parse_args(argv)
    make = curves_report if args.curves else report
    try:
        text, out = make(args.dirs, args.out, plot=not args.no_plot, md=args.md, png=args.png)
    except (ReportError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(text)
    print(f"-> {out}", file=sys.stderr)
    return 0
