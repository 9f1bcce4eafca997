"""The (network, learning rate) grid at a glance: which cells learned, which died, which diverged.

One cell per (network, lr, update cap): its test error and its outcome. A cell *learned* when its test
error is at least 10 points below chance (80% on CIFAR-10). One that ended at chance by curves.died_at
(train loss at ln C, accuracy at 1/C) *died* when its gradient is gone too (mean gradient norm of the
last epoch below DEAD_GRAD_NORM: dead ReLUs pass nothing back) or when its output is the same for every
test image (metrics.json's test_score_spread below DEAD_SPREAD: every ReLU of some layer is dead, so
nothing of the image reaches the output, though the class layer's bias may still move), and is *at
chance* when the gradient still moves it and its output still depends on the image (on a short
horizon, a slow start looks like this). It *diverged* when the run stopped
on a non-finite loss; otherwise it is *near chance*.

A cell run with several seeds shows the median test error and how many seeds ended each way other than
*learned* ("died 3/8"): at the edge of stability the same cell lives or dies with the seed. Runs that
differ in a setting other than the network, lr, cap and seed (model.final_weights=zero,init in one sweep,
say) are never seeds of one cell: each setting is a panel of its own. The page (grid.md) holds one table
per panel, the figure (grid.png) one heatmap per panel: networks down, lrs across, colour = test error,
cells where a seed died or diverged marked.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from allconv import run_record as rr
from allconv.errors import ReportError
from allconv.report.curves import Trace, trace
from allconv.report.pages import KEEP_MARKER, runs_or_error, save_figure, wrap, writable, write_page
from allconv.report.runs import ORDER, _cap_text, settings_label
from allconv.report.table import NAME

LEARNED_MARGIN = 0.10  # below chance by this much: learned, not noise
# A dead network's last-epoch mean gradient norm: 0.00-0.03 when its class maps died too, 0.07-0.09 when
# their bias still moves, which overlaps live networks (from 0.08): DEAD_SPREAD tells those apart.
DEAD_GRAD_NORM = 0.05
DEAD_SPREAD = 1e-5     # a class score's range over the test images: exactly 0 when nothing of the image gets through


# What a cell's place says already (rows, columns, the cap's panel) or what repeats it (the seed).
PLACED = {"model.family", "model.variant", "optim.lr", "optim.max_update_norm", "seed"}


@dataclass
class Cell:
    model: str
    lr: float
    cap: float | None
    test_error: float | None
    outcome: str  # learned | near chance | at chance | died, or the run's status when it did not finish
    seed: int | None = None
    setting: tuple = ()              # (key, value) of the other settings that differ between the runs


def _flat(config: dict, prefix: str = "", depth: int = 3) -> dict[str, str]:
    """config's keys as dotted names; deeper than `depth` levels (not a config of ours) a value is its repr.
    Values are cut at 80 characters: a saved config comes from elsewhere and names a panel."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and depth > 0:
            out |= _flat(value, f"{prefix}{key}.", depth - 1)
        else:
            out[f"{prefix}{key}"] = (value if isinstance(value, str) else repr(value))[:80]
    return out


def _settings(runs) -> list[tuple]:
    """Per run, the (key, value) pairs of model/optim/data/trainer that differ between the runs (PLACED aside)."""
    flat = [_flat({k: v for k, v in r.config.items() if k in ("model", "optim", "data", "trainer")})
            for r in runs]
    keys = sorted(k for k in set().union(*flat) if k not in PLACED and len({f.get(k) for f in flat}) > 1)
    return [tuple((k, f.get(k, "–")) for k in keys) for f in flat]


def outcome(t: Trace) -> str:
    r = t.run
    if r.status == rr.DIVERGED:
        return rr.DIVERGED
    if t.died_at is not None:
        grad = t.series.get("train/grad_norm", {})
        spread = r.metrics.get("test_score_spread")
        constant = spread is not None and spread < DEAD_SPREAD
        alive = grad and grad[max(grad)] >= DEAD_GRAD_NORM and not constant
        return "at chance" if alive else "died"
    if r.status != rr.FINISHED:
        return r.status  # failed | interrupted | started | unreadable
    chance = 1 - 1 / t.num_classes
    return "learned" if r.metrics["test_error"] <= chance - LEARNED_MARGIN else "near chance"


def cells(traces: list[Trace]) -> list[Cell]:
    placed = [t for t in traces if t.run.model is not None and t.run.lr is not None]
    out = []
    for t, setting in zip(placed, _settings([t.run for t in placed]), strict=True):
        r = t.run
        error = r.metrics.get("test_error") if r.status == rr.FINISHED else None
        out.append(Cell(r.model, r.lr, r.cap, error, outcome(t), r.seed, setting))
    return out


Panel = tuple  # (cap, setting)


def _axes(found: list[Cell]) -> tuple[list[str], list[float], list[Panel]]:
    models = sorted({c.model for c in found}, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
    lrs = sorted({c.lr for c in found}, reverse=True)
    panels = sorted({(c.cap, c.setting) for c in found}, key=lambda p: (p[0] is None, p[0] or 0, p[1]))
    return models, lrs, panels


def _panel_title(panel: Panel) -> str:
    cap, setting = panel
    return ", ".join([_cap_text(cap)] + [f"{k}={v}" for k, v in setting])


@dataclass
class Seeds:
    """The runs of one cell (one per seed): the median test error and how many ended each way."""
    cells: list[Cell]

    @property
    def median(self) -> float | None:
        errors = [c.test_error for c in self.cells if c.test_error is not None and math.isfinite(c.test_error)]
        return statistics.median(errors) if errors else None

    def count(self, outcome: str) -> int:
        return sum(c.outcome == outcome for c in self.cells)

    @property
    def marked(self) -> bool:  # a seed died or diverged: hatched in the figure, bold on the page
        return any(c.outcome in ("died", "diverged", "failed") for c in self.cells)


def _lookup(found: list[Cell]) -> dict[tuple, Seeds]:
    table: dict[tuple, Seeds] = {}
    for c in sorted(found, key=lambda c: (c.seed is None, c.seed or 0)):
        table.setdefault((c.model, c.lr, (c.cap, c.setting)), Seeds([])).cells.append(c)
    return table


def _text(s: Seeds | None) -> str:
    if s is None:
        return "–"
    if len(s.cells) == 1:
        c = s.cells[0]
        if c.outcome in ("learned", "near chance", "at chance"):
            return f"{100 * c.test_error:.1f}" + ("" if c.outcome == "learned" else f" ({c.outcome})")
        return f"**{c.outcome}**" + (f" ({100 * c.test_error:.1f})" if c.test_error is not None else "")
    n, counts = len(s.cells), []
    for outcome in ("died", "diverged", "failed", "interrupted", "started", "unreadable", "at chance", "near chance"):
        if k := s.count(outcome):
            mark = "**" if outcome in ("died", "diverged", "failed") else ""
            counts.append(f"{mark}{outcome} {k}/{n}{mark}")
    median = f"{100 * s.median:.1f}" if s.median is not None else "–"
    return f"{median} ({', '.join(counts) if counts else f'{n} seeds'})"


def grid_page(found: list[Cell], label: str, command: str, png_link: str | None) -> str:
    models, lrs, panels = _axes(found)
    table = _lookup(found)
    lines = ["# The (network, learning rate) grid", "", f"**{label}**", "",
             f"Generated by `{command}` from {len(found)} runs. Test error %, and the cell's outcome: *at chance* = "
             f"ended with train loss at ln C and accuracy at 1/C but a gradient norm >= {DEAD_GRAD_NORM:g} and "
             f"an output that depends on the image, *died* = the same with the gradient gone or one output for every "
             f"test image, *diverged* = stopped on a non-finite loss, *near chance* = less than "
             f"{100 * LEARNED_MARGIN:.0f} points below chance, not at chance. A cell with several seeds: the median "
             f"test error, and how many seeds ended other than *learned*.", ""]
    if png_link:
        lines += [f"![grid]({png_link})", ""]
    for panel in panels:
        lines += [f"## {_panel_title(panel)}", "", "| network | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                  "|---|" + "---|" * len(lrs)]
        for m in models:
            lines.append(f"| {NAME.get(m, m)} | " + " | ".join(_text(table.get((m, lr, panel))) for lr in lrs)
                         + " |")
        counts = {}
        for c in found:
            if (c.cap, c.setting) == panel:
                counts[c.outcome] = counts.get(c.outcome, 0) + 1
        lines += ["", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".", ""]
    return "\n".join(lines) + "\n" + KEEP_MARKER + "\n"


def _figure_text(cell: Seeds | None, value: float) -> tuple[str, bool]:
    """A heatmap cell's words, and whether it shows a test error."""
    if cell is None:
        return "–", False
    short = {"died": "dead", "diverged": "NaN", "failed": "failed", "interrupted": "?", "started": "?",
             "unreadable": "?"}
    if len(cell.cells) == 1:
        c = cell.cells[0]
        if c.outcome in short:
            return short[c.outcome], False
        return f"{value:.0f}" + ("\nat chance" if c.outcome == "at chance" else ""), True
    n = len(cell.cells)
    lines = [f"{value:.0f}" if not math.isnan(value) else "–"]
    lines += [f"{short.get(o, o)} {k}/{n}" for o in ("died", "diverged", "failed", "at chance") if (k := cell.count(o))]
    return "\n".join(lines), not math.isnan(value)


def grid_figure(found: list[Cell], label: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models, lrs, panels = _axes(found)
    table = _lookup(found)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.3 * len(lrs) * len(panels), 0.45 * len(models) + 2.2),
                             layout="constrained", squeeze=False)
    image = None
    errors = [100 * c.test_error for c in found if c.test_error is not None and math.isfinite(c.test_error)]
    low = 5 * math.floor(min(errors, default=0) / 5)  # the scale spans the grid's errors up to chance
    high = max(errors, default=100)
    for ax, panel in zip(axes[0], panels, strict=True):
        values = np.full((len(models), len(lrs)), np.nan)
        for i, m in enumerate(models):
            for j, lr in enumerate(lrs):
                cell = table.get((m, lr, panel))
                if cell is not None and cell.median is not None:
                    values[i, j] = 100 * cell.median
        image = ax.imshow(values, cmap="viridis_r", vmin=low, vmax=high, aspect="auto")
        for i, m in enumerate(models):
            for j, lr in enumerate(lrs):
                cell = table.get((m, lr, panel))
                text, shown = _figure_text(cell, values[i, j])
                dark = shown and values[i, j] > (low + high) / 2  # viridis_r: high errors are dark
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if len(text) < 12 else 7,
                        color="white" if dark else "black", fontweight="bold" if cell and cell.marked else "normal")
                if cell is not None and cell.marked:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", ec="red", lw=0))
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_yticks(range(len(models)), [NAME.get(m, m) for m in models])
        ax.set_xlabel("learning rate")
        ax.set_title(wrap(_panel_title(panel), 40), fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), label="test error (%)", shrink=0.9)
    repeats = max(len(c.cells) for c in table.values())
    seeds = f"; median of {repeats} seeds, k/n = seeds that ended so" if repeats > 1 else ""
    fig.suptitle(f"Test error per (network, lr){seeds}; dead (at chance with no gradient, or one output for every "
                 f"image) hatched\n{wrap(label, 100)}", fontsize=10)
    return fig


def grid_report(dirs: list[Path], out: Path | None = None, plot: bool = True, md: Path | None = None,
                png: Path | None = None) -> tuple[str, Path]:
    import os

    runs = runs_or_error(dirs)
    found = cells([trace(r) for r in runs])
    if not found:
        raise ReportError(f"no run under {', '.join(map(str, dirs))} names its network and lr")
    md = writable(md or (out or dirs[0]) / "grid.md")
    png = writable(png or (out or dirs[0]) / "grid.png")
    label = settings_label(runs)
    link = Path(os.path.relpath(png.resolve(), md.resolve().parent)).as_posix() if plot else None
    command = " ".join(["python src/report.py", *map(str, dirs), "--grid", f"--md {md}",
                        f"--png {png}" if plot else "--no-plot"])
    text = grid_page(found, label, command, link)
    if plot:
        save_figure(grid_figure(found, label), png)
    return write_page(md, text), md.parent
