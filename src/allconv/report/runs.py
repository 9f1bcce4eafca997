"""Run folders as records: what each run was (model, lr, cap, seed, settings) and how it ended.

Every run folder below the given folders is read through allconv.run_folder: one that finished with a finite
test error counts; one that failed, diverged, was interrupted, has no metrics.json yet (started: killed or still
running) or an unreadable or malformed record is listed with that status (run_record's words), never crashed on
and never ranked. A run's settings come from its identity.json (what it trained with, resolved when it started)
and its metrics.json, so runs that share model and lr but not the update cap (optim.max_update_norm) stay apart.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from allconv import models, run_folder
from allconv import run_record as rr
from allconv.errors import ReportError, RunFolderError
from allconv.run_folder import RunFolder

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
# With augmentation (translations and flips) the paper reports All-CNN-C only; the review ran none.
AUGMENTED_REFERENCE: dict[str, tuple[float, float | None]] = {"all_cnn_c": (7.25, None)}
ORDER = [models.config_name(f, v) for f, v in models.all_networks()]
# The paper's training setting; a setting missing from a run's files is not compared.
PAPER = {"width": 1.0, "epochs": 350, "data": "CIFAR-10", "preprocess": "gcn_zca", "augment": False,
         "held_out": 0, "cap": None}
PAPER_TEXT = "width 1, 350 epochs, CIFAR-10, no augmentation"


@dataclass
class Run:
    path: Path
    status: str  # run_record's words: finished | failed | diverged | interrupted | started | unreadable
    model: str | None = None
    lr: float | None = None
    seed: int | None = None
    metrics: dict = field(default_factory=dict)
    error: str = ""
    config: dict = field(default_factory=dict)   # identity.json's settings, nested; {} when absent

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
    def augmented(self) -> bool:
        """data.augment (saved config, else metrics.json): an augmented run is its own row, never a plain one's seed."""
        data = self.config.get("data")
        return (data if isinstance(data, dict) and "augment" in data else self.metrics).get("augment") is True

    @property
    def cap(self) -> float | None:
        """optim.max_update_norm (saved config, else metrics.json); None for plain SGD or when not recorded."""
        optim = self.config.get("optim")
        known = optim if isinstance(optim, dict) and "max_update_norm" in optim else self.metrics
        return known.get("max_update_norm")


def _saved_config(folder: RunFolder) -> dict:
    """identity.json's settings as nested sections ({} when absent or damaged)."""
    try:
        identity = folder.read_identity()
    except RunFolderError:
        return {}
    cfg: dict = {}
    for key, value in (identity or {}).get("settings", {}).items():
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[leaf] = value
    cap = (cfg.get("optim") or {}).get("max_update_norm")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap)):
        return {}
    return cfg


def _number(m: dict, key: str, low: float = -math.inf, high: float = math.inf):
    """m[key] when it is a finite number in [low, high] (None when absent); ValueError naming the key otherwise."""
    v = m.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
        raise ValueError(f"{key}={v!r} is not a finite number in [{low:g}, {high:g}]")
    return v


def _checked(m) -> dict:
    """metrics.json's fields this report reads, with the types it reads them as; ValueError names the first bad one."""
    if not isinstance(m, dict):
        raise ValueError(f"holds a {type(m).__name__}, not an object")
    for key in ("status", "model", "network", "error", "data", "family", "variant", "preprocess"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise ValueError(f"{key}={m[key]!r} is not a string")
    if m.get("seed") is not None and (isinstance(m["seed"], bool) or not isinstance(m["seed"], int)):
        raise ValueError(f"seed={m['seed']!r} is not an integer")
    _number(m, "lr", 0, math.inf)
    _number(m, "max_update_norm", 0, math.inf)
    for key in ("wall_time_s", "params", "epochs", "width", "test_score_spread"):
        _number(m, key, 0)
    for key in ("test_error", "val_error"):
        _number(m, key, 0, 1)
    return m


def _read_run(folder: RunFolder) -> Run:
    if not os.path.lexists(folder.metrics):
        status = folder.state()
        when = "killed after a checkpoint" if status == rr.INTERRUPTED else "killed or still running"
        return Run(folder.path, status, error=f"no metrics.json ({when}; continue with `python src/train.py "
                                              f"resume={folder.path}`)")
    try:  # NaN and Infinity parse (json's extension) and are refused by _checked: never ranked
        m = _checked(folder.outcome())  # a link, FIFO or nested record: one line, no hang
        status = rr.status_of(m) or (rr.FINISHED if "status" not in m else rr.FAILED)
        run = Run(folder.path, status, m.get("model"), float(m["lr"]) if m.get("lr") is not None else None,
                  int(m.get("seed", 0)), m, m.get("error", ""))
        if run.status == rr.FINISHED and m.get("test_error") is None:
            run.status, run.error = rr.UNREADABLE, "metrics.json has no test_error"
        return run
    except (OSError, ValueError, TypeError, AttributeError, RecursionError) as e:
        detail = str(e).splitlines()[0][:120] if isinstance(e, ValueError) and str(e) else type(e).__name__
        return Run(folder.path, rr.UNREADABLE, error=f"metrics.json unreadable ({detail})")


def read_run(run_dir: Path) -> Run:
    folder = RunFolder(run_dir)
    run = _read_run(folder)
    run.config = c = _saved_config(folder)
    model, optim = c.get("model") or {}, c.get("optim") or {}
    try:  # a run killed before metrics.json: what its identity says
        if run.model is None and model.get("family") and model.get("variant"):
            run.model = models.config_name(model["family"], model["variant"])
        if run.lr is None and isinstance(optim.get("lr"), (int, float)):
            run.lr = float(optim["lr"])
        if run.seed is None and isinstance(c.get("seed"), int):
            run.seed = c["seed"]
    except (KeyError, AttributeError):
        pass
    if run.seed is None:
        run.seed = 0
    return run


def _identity(folder: RunFolder) -> str | None:
    """What makes two folders one run (allconv.run_folder): its settings, less what a continuation may change,
    and its data; None when the folder does not record them."""
    try:
        recorded = folder.read_identity()
    except RunFolderError:
        return None
    if not recorded:  # older folders record no identity: never merged
        return None
    kept = {k: v for k, v in recorded["settings"].items() if not run_folder.may_change(k)}
    return json.dumps([kept, recorded.get("data")], sort_keys=True, default=str)


def find_runs(dirs: list[Path]) -> list[Run]:
    """Run folders under dirs: any folder holding a record (run_folder.RunFolder.RECORD), not a sweep's root.
    A folder that holds the same run as one already read (a copy) is counted once; the debug presets' folders
    (a `debug` folder on the way down, as in multirun/debug/) are read only when given themselves."""
    runs, seen, identities = [], set(), {}
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"{d}: no such directory")
        candidates = {p.parent for name in RunFolder.RECORD_FILES for p in d.rglob(name)}
        for run_dir in sorted(candidates):
            key = run_dir.resolve()
            if key in seen or (run_dir / "multirun.yaml").is_file():
                continue
            if "debug" in run_dir.relative_to(d).parts[:-1]:  # debug=... runs (outputs/debug/): only when asked
                continue
            seen.add(key)
            run = read_run(run_dir)
            identity = _identity(RunFolder(run_dir)) if run.status == rr.FINISHED else None
            if identity is not None and identity in identities:
                print(f"report: {run_dir} holds the same run as {identities[identity]}; counted once", file=sys.stderr)
                continue
            if identity is not None:
                identities[identity] = run_dir
            runs.append(run)
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



def _g(x) -> str:
    return "?" if x is None else f"{x:g}"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"
