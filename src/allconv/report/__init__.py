"""Sweep folders to pages and figures: python src/report.py <sweep dir> [...] [--curves | --grid] [--out DIR].

Three views of the same run folders (runs.py reads them; a malformed one is listed, never ranked):
table.py, the paper's Table 1 with the paper's and the review's errors and the rank comparison
(report.md, report.png); curves.py, one row and one learning curve per run (curves.md, curves.png);
grid.py, every (network, lr, cap) cell learned, near chance, died or diverged (grid.md, grid.png).
Each page and figure states how the runs differ from the paper's setting (width 1, 350 epochs,
CIFAR-10, no augmentation). --md / --png choose other file names; text below pages.KEEP_MARKER in
an existing page is kept when the page is rewritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from allconv.errors import ReportError, WriteError


def _tags(text: str) -> list[str]:
    tags = [t.strip() for t in text.split(",")]
    if not all(tags):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of tags (e.g. paper,cpu)")
    return tags


def main(argv: list[str] | None = None) -> int:
    from allconv.report.curves import curves_report
    from allconv.report.grid import grid_report
    from allconv.report.table import report

    ap = argparse.ArgumentParser(description="Markdown table + figure of sweep results: Table 1 vs the paper, "
                                             "(--curves) one row and one learning curve per run, or (--grid) the "
                                             "(network, lr) grid with dead cells marked.")
    ap.add_argument("dirs", nargs="+", type=Path, help="sweep or run folders (searched recursively)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--curves", action="store_true",
                      help="one row per run (outcome: trained to the end / died at epoch k) and the learning curves")
    mode.add_argument("--grid", action="store_true",
                      help="one cell per (network, lr, cap): test error, or died / diverged; a heatmap per cap")
    ap.add_argument("--out", type=Path, default=None, help="folder for the page and figure (default: first dir)")
    ap.add_argument("--md", type=Path, default=None, help="the page (default: <out>/report.md, curves.md or grid.md)")
    ap.add_argument("--png", type=Path, default=None,
                    help="the figure (default: <out>/report.png, curves.png or grid.png)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--tags", type=_tags, default=None, metavar="TAG,TAG",
                    help="only the runs holding every one of these tags (tags=[...] when they were trained)")
    args = ap.parse_args(argv)
    make = curves_report if args.curves else grid_report if args.grid else report
    try:
        text, out = make(args.dirs, args.out, plot=not args.no_plot, md=args.md, png=args.png, tags=args.tags)
    except (ReportError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(text)
    print(f"-> {out}", file=sys.stderr)
    return 0
