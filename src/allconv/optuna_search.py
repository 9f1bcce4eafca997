"""What the Optuna sweeper (hydra_plugins.allconv_sweepers) needs that is not Hydra's: the search space from
Hydra's override grammar, the study file in the sweep folder, and the figure of the search.

The study lives in <sweep dir>/optuna.db (SQLite, written by Optuna through SQLAlchemy, transactional). The file
and the folder come from outside, so they are checked before SQLite opens them: a link at any name the study
writes (its journal and WAL files too) is refused rather than followed, a FIFO would block the open, and a file
that is not an SQLite database or holds no study Optuna can read is one line, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import stat
from pathlib import Path

from allconv.errors import ConfigError

DB = "optuna.db"
PLOT = "optuna.png"
LOCK_GUARDS = "nothing now stops a second sweep from running this study at the same time"
SQLITE_HEADER = b"SQLite format 3\x00"
# Every name the study and the sweeper write directly into the sweep folder: none may be a link.
WRITTEN = (DB, f"{DB}-journal", f"{DB}-wal", f"{DB}-shm", "multirun.yaml", PLOT)
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "qmc": "QMCSampler"}
OBJECTIVES = ("test_error", "val_error")  # a finished run's metrics.json key; the study minimises it


# -- the search space ------------------------------------------------------------------------------------
def distribution(override):
    """An Optuna distribution from a Hydra sweep override: choice(...) and range(...) categorical,
    interval(a, b) uniform, tag(log, interval(a, b)) log-uniform (as hydra-optuna-sweeper reads them)."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key, value = override.get_key_element(), override.value()
    if override.is_choice_sweep() or override.is_range_sweep():  # a range's values, exactly as Hydra lists them
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_interval_sweep():
        log = "log" in value.tags
        if not (value.start < value.end) or (log and value.start <= 0):
            raise ConfigError(f"{key}: interval({value.start}, {value.end}) is empty{' or not > 0 (log)' * log}; "
                              f"give interval(low, high) with low < high")
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise ConfigError(f"{key}: {override.input_line} is not a search space; use choice(...), range(...), "
                      f"interval(low, high) or tag(log, interval(low, high))")


def bounds(space: dict) -> list[dict]:
    """Two points of the space, every key at its low end, then at its high end (what the pre-flight checks)."""
    from optuna.distributions import CategoricalDistribution

    def end(d, i):
        if isinstance(d, CategoricalDistribution):
            return d.choices[i]
        return d.low if i == 0 else d.high

    return [{k: end(d, i) for k, d in space.items()} for i in (0, -1)]


def as_override(key: str, value) -> str:
    """key=value as Hydra's parser reads it back to the same value (repr keeps every digit of a float)."""
    if isinstance(value, bool) or value is None:
        return f"{key}={'null' if value is None else str(value).lower()}"
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


def space_json(space: dict) -> str:
    from optuna.distributions import distribution_to_json

    return json.dumps({k: json.loads(distribution_to_json(d)) for k, d in sorted(space.items())}, sort_keys=True)


# -- the study file --------------------------------------------------------------------------------------
def check_folder(sweep: Path) -> None:
    """Nothing the sweeper writes in `sweep` goes through a link, and the study file is a plain SQLite file."""
    if sweep.is_symlink():
        raise ConfigError(f"hydra.sweep.dir={str(sweep)!r} is a symbolic link (to {os.readlink(sweep)}); a study "
                          f"is written only inside its own folder: give the folder itself")
    for name in WRITTEN:
        if (sweep / name).is_symlink():
            raise ConfigError(f"{sweep / name} is a symbolic link (to {os.readlink(sweep / name)}); a study is "
                              f"written only inside its own folder: remove the link")
    db = sweep / DB
    try:
        mode = os.lstat(db).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{db} is not a plain file; it is where this sweep keeps its Optuna study: move it away")
    with open(db, "rb") as f:
        head = f.read(len(SQLITE_HEADER))
    if head and head != SQLITE_HEADER:
        raise ConfigError(f"{db} is not an SQLite database (the study of this sweep); move it away or choose "
                          f"another hydra.sweep.dir")
    if head:  # read-only: Optuna would add its tables to another program's database
        import sqlite3

        try:
            with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
                tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.Error as e:
            raise ConfigError(f"{db} cannot be read as an Optuna study ({e}); move it away or choose another "
                              f"hydra.sweep.dir") from None
        if tables and not {"studies", "trials", "version_info"} <= tables:
            raise ConfigError(f"{db} is an SQLite database without an Optuna study (tables: "
                              f"{', '.join(sorted(tables)[:5])}); move it away or choose another hydra.sweep.dir")


def open_study(sweep: Path, name: str):
    """The study `name` in sweep/optuna.db, created if absent; ConfigError in one line for a file Optuna cannot
    read (damaged, another program's database, a study file of an Optuna with another schema)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.CRITICAL)  # the failure is the one line below, not its log
    try:
        study = optuna.create_study(storage=f"sqlite:///{sweep / DB}", study_name=name, direction="minimize",
                                    load_if_exists=True)
        study.get_trials(deepcopy=False)  # all it holds, read once here: a table of another program fails now
        study.user_attrs  # noqa: B018
        return study
    except Exception as e:  # SQLAlchemy's and Optuna's errors for a bad file have no common base
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{sweep / DB} cannot be read as an Optuna study ({first}); move it away or choose "
                          f"another hydra.sweep.dir") from None
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def sampler(name: str, seed: int | None, kwargs: dict):
    import optuna

    if name not in SAMPLERS:
        raise ConfigError(f"hydra.sweeper.sampler={name!r} is not a sampler here; allowed: {', '.join(SAMPLERS)}")
    cls = getattr(optuna.samplers, SAMPLERS[name])
    try:
        return cls(seed=seed, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"hydra.sweeper.sampler_kwargs={kwargs}: {SAMPLERS[name]} refuses them ({e})") from None


# -- the figure ------------------------------------------------------------------------------------------
def plot(study, objective: str, path: Path) -> None:
    """optuna.png: the objective by trial with the best so far, and against each searched value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.distributions import FloatDistribution, IntDistribution
    from optuna.trial import TrialState

    from allconv.files import write_atomic

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    keys = sorted({k for t in done for k in t.params})
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4.2 * (1 + len(keys)), 3.4), squeeze=False)
    ax = axes[0][0]
    numbers, values = [t.number for t in done], [t.value for t in done]
    ax.plot(numbers, values, "o", label=objective)
    best = [min(values[: i + 1]) for i in range(len(values))]
    ax.step(numbers, best, where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel=objective, title=f"{study.study_name}: {len(done)} complete")
    ax.legend(fontsize=8)
    for ax, key in zip(axes[0][1:], keys, strict=True):
        dist = next(t.distributions[key] for t in done if key in t.distributions)
        xs = [t.params[key] for t in done if key in t.params]
        ys = [t.value for t in done if key in t.params]
        if isinstance(dist, (FloatDistribution, IntDistribution)):
            points = ax.scatter(xs, ys, c=[t.number for t in done if key in t.params], cmap="viridis")
            fig.colorbar(points, ax=ax, label="trial")
            if dist.log:
                ax.set_xscale("log")
        else:
            ax.scatter([str(x) for x in xs], ys)
        ax.set(xlabel=key, ylabel=objective)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
