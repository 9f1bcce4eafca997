"""Writing a report's page and figure: whole or not at all, a hand-written tail kept, one line when refused."""

from __future__ import annotations

import textwrap
from pathlib import Path

from allconv.errors import ReportError
from allconv.files import figure_bytes, write_atomic
from allconv.report.runs import Run, find_runs, with_tags

KEEP_MARKER = "<!-- Text below this line is written by hand; src/report.py keeps it when it rewrites the page. -->"


def wrap(text: str, width: int = 110) -> str:
    return "\n".join(textwrap.wrap(text, width))


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        write_atomic(path, figure_bytes(fig, dpi=120))  # whole or not at all; WriteError names the file
    finally:
        plt.close(fig)


def runs_or_error(dirs: list[Path], tags: list[str] | None = None) -> list[Run]:
    runs = find_runs(dirs)
    if tags:
        found = len(runs)
        runs = with_tags(runs, tags)
        if not runs:
            raise ReportError(f"none of the {found} runs under {', '.join(map(str, dirs))} holds every tag of "
                              f"--tags {','.join(tags)} (a run's tags: tags=[...] when it was trained)")
    if not runs:
        raise ReportError(f"no runs under {', '.join(map(str, dirs))} (no folder holds metrics.json or "
                          f"identity.json)")
    return runs


def writable(path: Path) -> Path:
    if path.is_dir():
        raise ReportError(f"{path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"{path.parent}: cannot create ({e.strerror})") from None
    return path


def write_page(path: Path, text: str) -> str:
    """Write text to path, keeping whatever an existing page has below KEEP_MARKER."""
    writable(path)
    try:
        old = path.read_text() if path.is_file() else ""
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read the page to keep its hand-written part ({e})") from None
    if KEEP_MARKER in old:
        text = text.split(KEEP_MARKER, 1)[0].rstrip("\n") + "\n\n" + KEEP_MARKER + old.split(KEEP_MARKER, 1)[1]
    write_atomic(path, text.encode())
    return text
