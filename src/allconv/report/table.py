"""The paper's Table 1 from sweep folders: per network the best learning rate, its test error beside the
paper's and the review's, the rank order against the paper's and the paper's claims checked one by one.

Per model the learning rate is chosen on the mean validation error over seeds when every run of that
model has one, otherwise on the test error, labelled so ("selected on test, as the paper did");
(model, lr, seed) cells of the grid with no folder are listed as missing. The table (report.md) and
a bar chart of ours vs the paper vs the review (report.png) go to --out (default: the first folder).
Runs with data.augment are a row of their own beside the plain one (the paper's augmented error beside
it) and stay out of the rank order and the claims, which are Table 1's, without augmentation.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from allconv import models
from allconv import run_record as rr
from allconv.report.pages import runs_or_error, save_figure, wrap, writable, write_page
from allconv.report.runs import AUGMENTED_REFERENCE, ORDER, REFERENCE, Run, _cap_text, _g, fmt_time, settings_label

ON_TEST = "selected on test, as the paper did"
NAME = {models.config_name(f, v): models.paper_name(f, v) for f, v in models.all_networks()}


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
    augmented: bool = False          # trained with data.augment: its own row, outside the paper's Table 1

    @property
    def reference(self) -> tuple[float | None, float | None]:
        """(the paper's, the review's) error in % for this row's setting; None where neither reports one."""
        return (AUGMENTED_REFERENCE if self.augmented else REFERENCE).get(self.model, (None, None))


def summarise(runs: list[Run]) -> tuple[list[Row], list[Run], list[tuple[str, float, int]]]:
    """(one row per model, the runs that did not finish, the (model, lr, seed) cells with no folder)."""
    ok = [r for r in runs if r.status == rr.FINISHED and r.model and r.lr is not None]
    bad = [r for r in runs if r not in ok]
    by_model: dict[tuple[str, bool], dict[tuple, list[Run]]] = {}
    for r in ok:
        by_model.setdefault((r.model, r.augmented), {}).setdefault((r.lr, r.cap), []).append(r)
    rows = []
    for model, augmented in sorted(by_model, key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else len(ORDER), *k)):
        cells = by_model[model, augmented]
        on_val = all("val_error" in r.metrics for rs in cells.values() for r in rs)
        key = "val_error" if on_val else "test_error"
        best = min(cells, key=lambda s: (statistics.fmean(r.metrics[key] for r in cells[s]), s[0],
                                         s[1] is None, s[1] or 0))
        chosen = sorted(cells[best], key=lambda r: r.seed)
        mean, std = _mean_std([100 * r.metrics["test_error"] for r in chosen])
        walls = [r.metrics["wall_time_s"] for r in chosen if isinstance(r.metrics.get("wall_time_s"), (int, float))]
        name = chosen[0].metrics.get("network", model) + (", augmented" if augmented else "")
        rows.append(Row(model, name, best[0], best[1], [r.seed for r in chosen],
                        (mean, std), "validation" if on_val else ON_TEST, chosen[0].metrics.get("params"),
                        statistics.fmean(walls) if walls else None, len(cells), augmented))
    present = {(r.model, r.lr, r.seed) for r in runs}
    grid_models = sorted({r.model for r in runs if r.model}, key=lambda m: ORDER.index(m) if m in ORDER else 99)
    lrs = sorted({r.lr for r in runs if r.lr is not None}, reverse=True)
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    missing = [(m, lr, s) for m in grid_models for lr in lrs for s in seeds if (m, lr, s) not in present]
    return rows, bad, missing



def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"



def markdown(rows: list[Row], bad: list[Run], missing: list, runs: list[Run]) -> str:
    show_cap = len({r.cap for r in runs}) > 1  # else the cap is in the settings line
    lines = ["# All-CNN reproduction: test error on the paper's grid", "",
             f"**{settings_label(runs)}** The paper's and the review's errors are those of PAPER.md.", "",
             f"{len(runs)} run folders: {sum(r.status == rr.FINISHED for r in runs)} finished, "
             f"{len(bad)} failed or incomplete, {len(missing)} grid cells missing.", "",
             "| model | chosen lr | lr selected on | seeds | test error % (mean ± std) | paper % | review % "
             "| params | wall time / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper, review = r.reference
        params = f"{r.params:,}" if isinstance(r.params, int) else "–"
        cap = f", {_cap_text(r.cap)}" if show_cap else ""
        lines.append(f"| {r.name} | {r.lr:g}{cap} (of {r.n_lrs}) | {r.selected_on} | {', '.join(map(str, r.seeds))} "
                     f"| {r.test[0]:.2f}{f' ± {r.test[1]:.2f}' if len(r.seeds) > 1 else ''} "
                     f"| {_pct(paper)} | {_pct(review)} | {params} "
                     f"| {fmt_time(r.wall_s)} |")
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



def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank (Spearman's convention)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(ours: list[float], theirs: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on the ranks); None below 3 pairs or for a constant side."""
    if len(ours) < 3:
        return None
    a, b = _ranks(ours), _ranks(theirs)
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    den = (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5
    return num / den if den else None


@dataclass
class Claim:
    text: str                        # the paper's claim, e.g. "All-CNN-A beats Model A"
    paper: tuple[float, float]       # the paper's errors (%) of the two sides
    ours: tuple[float, float]        # ours
    holds: bool


def claims(rows: list[Row]) -> list[Claim]:
    """The paper's comparisons within each family, in the direction Table 1 gives them, checked on our rows:
    All-CNN vs the base model, ConvPool vs All-CNN, and the strided network last of its family."""
    ours = {r.model: r.test[0] for r in rows if not r.augmented}
    paper = {m: REFERENCE[m][0] for m in REFERENCE}
    out = []
    for f in "abc":
        name = {v: models.config_name(f, v) for v in models.NAMES}  # base, strided, convpool, allcnn
        for a, b in (("allcnn", "base"), ("convpool", "allcnn")):
            if name[a] not in ours or name[b] not in ours:
                continue
            first, second = sorted((name[a], name[b]), key=paper.get)  # the paper's better one first
            out.append(Claim(f"{NAME[first]} beats {NAME[second]}", (paper[first], paper[second]),
                             (ours[first], ours[second]), ours[first] < ours[second]))
        family, strided = list(name.values()), name["strided"]
        if all(m in ours for m in family) and max(family, key=paper.get) == strided:
            others = [m for m in family if m != strided]
            worst_paper, worst_ours = max(others, key=paper.get), max(others, key=ours.get)
            out.append(Claim(f"{NAME[strided]} is last of family {f.upper()}", (paper[strided], paper[worst_paper]),
                             (ours[strided], ours[worst_ours]), ours[strided] > ours[worst_ours]))
    return out


def comparison(rows: list[Row]) -> list[str]:
    """Markdown: the rank order against the paper's (Spearman's rho) and the paper's claims one by one, over
    the plain (unaugmented) rows: Table 1's setting."""
    rows = [r for r in rows if not r.augmented]
    ranked = [r for r in rows if r.model in REFERENCE]
    if not ranked:
        return []
    rho = spearman([r.test[0] for r in ranked], [REFERENCE[r.model][0] for r in ranked])
    rho_review = spearman([r.test[0] for r in ranked], [REFERENCE[r.model][1] for r in ranked])
    paper_review = spearman([REFERENCE[r.model][0] for r in ranked], [REFERENCE[r.model][1] for r in ranked])
    fmt = lambda x: "–" if x is None else f"{x:+.2f}"  # noqa: E731
    lines = ["", "## Against the paper's ordering", "",
             f"Spearman's rank correlation over the {len(ranked)} networks: ours vs the paper {fmt(rho)}, ours vs "
             f"the review {fmt(rho_review)} (the review vs the paper: {fmt(paper_review)}).", ""]
    found = claims(rows)
    if found:
        lines += ["| the paper's claim | paper % | ours % | holds here |", "|---|---|---|---|"]
        lines += [f"| {c.text} | {c.paper[0]:.2f} vs {c.paper[1]:.2f} | {c.ours[0]:.2f} vs {c.ours[1]:.2f} "
                  f"| {'yes' if c.holds else 'no'} |" for c in found]
        lines += ["", f"{sum(c.holds for c in found)} of {len(found)} of the paper's within-family comparisons "
                  f"hold at this scale."]
    return lines


def bar_figure(rows: list[Row], label: str):
    """Ours vs the paper vs the review per model; label (settings_label) is the figure's subtitle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [r.model + (" +aug" if r.augmented else "") for r in rows]
    refs = [[np.nan if v is None else v for v in r.reference] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(rows) + 2), 5.0), layout="constrained")
    ax.bar(x - 0.27, [r.test[0] for r in rows], 0.27, yerr=[r.test[1] for r in rows], capsize=3, label="ours")
    ax.bar(x, [paper for paper, _ in refs], 0.27, label="paper")
    ax.bar(x + 0.27, [review for _, review in refs], 0.27, label="review")
    ax.set_xticks(x, labels, rotation=35, ha="right")
    ax.set_ylabel("test error (%)")
    seeds = sorted({s for r in rows for s in r.seeds})
    seed_text = f"Seed{'s' if len(seeds) > 1 else ''}: {', '.join(map(str, seeds))}."
    ax.set_title(wrap(f"ours: {label[0].lower()}{label[1:]} {seed_text}", 80), fontsize=9)
    fig.suptitle("Test error: ours vs the paper (Table 1) vs the review")
    ax.legend()
    return fig


def report(dirs: list[Path], out: Path | None = None, plot: bool = True, md: Path | None = None,
           png: Path | None = None) -> tuple[str, Path]:
    runs = runs_or_error(dirs)
    rows, bad, missing = summarise(runs)
    text = markdown(rows, bad, missing, runs)
    text = text + "\n".join(comparison(rows)) + ("\n" if rows else "")
    md = writable(md or (out or dirs[0]) / "report.md")
    png = writable(png or (out or dirs[0]) / "report.png")
    text = write_page(md, text)
    if plot and rows:
        save_figure(bar_figure(rows, settings_label(runs)), png)
    return text, md.parent

