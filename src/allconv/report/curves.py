"""Learning curves from run folders: one row and one line per run, whether it trained to the end or died.

A run died at epoch k when from epoch k to its last logged epoch every epoch is at chance: train
loss >= ln(num_classes) - 0.02 and train accuracy <= 1/num_classes + 0.02 (dead ReLUs: the network
predicts the class prior whatever the input). The page (curves.md) and the figure (curves.png) say
how the runs differ from the paper's setting.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from allconv import run_record as rr
from allconv.errors import ReportError
from allconv.learning_curve import read_epochs
from allconv.report.pages import KEEP_MARKER, runs_or_error, save_figure, wrap, writable, write_page
from allconv.report.runs import ORDER, Run, _cap_text, _g, fmt_time, run_settings, settings_label
from allconv.run_folder import RunFolder

# At chance: a network whose ReLUs are all dead predicts the class prior whatever the input.
CHANCE_LOSS_TOL = 0.02
CHANCE_ACC_TOL = 0.02


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
        if r.status == rr.FINISHED:
            return died or f"trained to the end ({self.epochs} epochs)"
        said = (r.error or "").replace("|", "/").splitlines()[0] if r.error else "?"
        reason = {rr.FAILED: f"failed ({said})", rr.DIVERGED: f"diverged ({said})",
                  rr.STARTED: "no metrics.json (killed or still running)",
                  rr.INTERRUPTED: "interrupted (continue it with resume=)",
                  rr.UNREADABLE: "metrics.json unreadable"}.get(r.status, r.status)
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
        series = read_epochs(RunFolder(run.path).metrics_csv)
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
        elif t.run.status != rr.FINISHED:
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
    fig.suptitle(f"{_networks(traces)}: learning curves by learning rate and update cap\n{wrap(label, 120)}",
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
        test = r.metrics.get("test_error") if r.status == rr.FINISHED else None
        wall = r.metrics.get("wall_time_s") if isinstance(r.metrics.get("wall_time_s"), (int, float)) else None
        lines.append(f"| {r.path.name} | {r.network} | {_g(r.lr)} "
                     f"| {'none' if r.cap is None else f'{r.cap:g}'} | {t.epochs} | {_pc(_final(s, 'val/error'))} "
                     f"| {'–' if best is None else f'{100 * best[0]:.2f} ({best[1]})'} | {_pc(test)} "
                     f"| {'–' if loss is None else f'{loss:.3f}'} "
                     f"| {_pc0(_capped_at_first_lr(s))} "
                     f"| {t.fate()} | {_epoch_times(s)} | {fmt_time(wall)} |")
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
    trained = [t for t in traces if t.run.status == rr.FINISHED and t.died_at is None]
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
        if t.run.status != rr.FINISHED:
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
        capped = [t for t in group if t.run.cap is not None and t.run.status == rr.FINISHED]
        plain = [t for t in group if t.run.cap is None and t.run.status == rr.FINISHED]
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
             f"({sum(t.run.status == rr.FINISHED for t in traces)} finished); device (precision) the runs recorded: "
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
    runs = runs_or_error(dirs)
    traces = sorted((trace(r) for r in runs), key=_order)
    if not any(t.series for t in traces):
        raise ReportError(f"no run under {', '.join(map(str, dirs))} has a readable csv/metrics.csv "
                          "(learning curves need logger=csv)")
    md = writable(md or (out or dirs[0]) / "curves.md")
    png = writable(png or (out or dirs[0]) / "curves.png")
    label = settings_label(runs)
    link = Path(os.path.relpath(png.resolve(), md.resolve().parent)).as_posix() if plot else None
    command = " ".join(["python src/report.py", *map(str, dirs), "--curves", f"--md {md}",
                        f"--png {png}" if plot else "--no-plot"])
    text = curves_page(traces, label, command, link)
    if plot:
        save_figure(curves_figure(traces, label), png)
    return write_page(md, text), md.parent

