"""Resume a killed run from its last checkpoint: python src/train.py resume=<run dir> [key=value ...].

expand_argv() turns resume=<dir> into the run's own command line: the overrides Hydra saved in
<dir>/.hydra/overrides.yaml, ckpt_path=<dir>/checkpoints/last.ckpt and hydra.run.dir=<dir>, in run
mode. The run continues in the same folder and writes the metrics.json it would have written.

A run folder may come from elsewhere, so its overrides.yaml is data, not a command line: resume
replays only the project's own settings (run_settings(): the top-level keys and config groups of
conf/train.yaml, i.e. model, data, optim, trainer, logger, callbacks, experiment, debug, seed, print_config).
An entry that sets anything of Hydra's (hydra.*, hydra/...: callbacks, launchers, sweepers,
logging, all of which Hydra builds or runs), that places a config under another package (@), or
that holds `_target_` or an interpolation `${...}`, or a sweep, is refused with one line before
anything is written. Saved ckpt_path, hydra.run.dir and hydra.mode are dropped: resume sets them.

A resumed run keeps its settings. A key=value after resume= is compared with the run's saved
value (.hydra/config.yaml, else the config saved in last.ckpt; for a config group,
.hydra/hydra.yaml's runtime choices, else the saved overrides): equal is a no-op, different is refused,
except for what only
changes how the run is watched, not what it computes (ON_RESUME): print_config,
callbacks.progress_bar, callbacks.progress_bar_refresh, trainer.enable_progress_bar and the
logger (logger=... and logger.*). Everything is checked before Hydra starts, so a refused resume
leaves the folder as it was; run_folder.hold() then keeps a second resume of the same run out.

Lightning's checkpoint restores weights, optimiser, schedule and loop counters but not the random
state, so EpochSeed reseeds the global RNG (dropout) at the start of every epoch from (seed,
epoch, rank): a resumed run then draws what the uninterrupted run would have drawn, and ends with
the same weights. The data order is already a function of (seed, epoch) (data.DeviceLoader).
FitClock carries the training time in the checkpoint, so metrics.json's wall_time_s is the run's, over all
its launches.
"""

from __future__ import annotations

import math
import time
from functools import cache
from pathlib import Path

import lightning as L
import torch

from allconv.errors import ResumeError

CONF = Path(__file__).resolve().parents[2] / "conf"
SET_BY_RESUME = ("ckpt_path", "hydra.run.dir", "hydra.mode")
ON_RESUME = ("print_config", "callbacks.progress_bar", "callbacks.progress_bar_refresh",
             "trainer.enable_progress_bar", "logger")  # and logger.*
_UNSET = object()


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


@cache
def config_groups() -> frozenset[str]:
    """The config groups of conf/train.yaml's defaults list (model, data, ..., experiment), Hydra's own left out."""
    from omegaconf import OmegaConf

    groups = set()
    for entry in OmegaConf.to_container(OmegaConf.load(CONF / "train.yaml")).get("defaults", []):
        for name in entry if isinstance(entry, dict) else ():
            group = name.split()[-1].split("@")[0].split("/")[0]  # "override hydra/help" -> hydra
            if group != "hydra":
                groups.add(group)
    return frozenset(groups)


@cache
def run_settings() -> frozenset[str]:
    """What a run's saved overrides may set: conf/train.yaml's top-level keys and its config groups, not hydra."""
    from omegaconf import OmegaConf

    keys = set(OmegaConf.load(CONF / "train.yaml").keys()) - {"defaults", "hydra"}
    return frozenset(keys | config_groups())


def _allowed() -> str:
    return ", ".join(sorted(run_settings() - {"ckpt_path"}))


def _parse(override: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(override)
    except HydraException:
        return None


def _replayable(run: Path, entry) -> str | None:
    """The saved entry if resume replays it, None if resume sets it itself; ResumeError if it is refused."""
    def refuse(why: str) -> ResumeError:
        return ResumeError(f"resume={run}: .hydra/overrides.yaml entry {str(entry)!r} {why}; resume replays only "
                           f"the run's own settings ({_allowed()}), never hydra.*, _target_ or ${{...}}")

    if not isinstance(entry, str):
        raise refuse("is not a key=value override")
    if _key(entry) in SET_BY_RESUME:
        return None
    if "${" in entry:
        raise refuse("holds an interpolation")
    if "_target_" in entry:
        raise refuse("names a _target_ (an object to build)")
    o = _parse(entry)
    if o is None:
        raise refuse("is not a key=value override")
    if o.package is not None:
        raise refuse("places a config under another package (@)")
    if o.is_sweep_override():
        raise refuse("is a sweep")
    if o.key_or_group.split(".")[0].split("/")[0] not in run_settings():
        raise refuse("is not a setting of the run")
    return entry


def _load_yaml(path: Path):
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # absent, unreadable or not YAML: no saved value from it
        return None


def _lookup(tree, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _UNSET
        tree = tree[part]
    return tree


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _shown(value) -> str:
    return "unset" if value is _UNSET else "null" if value is None else str(value)


def check_extra(run: Path, extra: list[str], kept: list[str], saved_config: dict | None = None) -> None:
    """Each key=value after resume= is ON_RESUME or equal to the run's saved value; else one ResumeError.

    The saved value is .hydra/config.yaml's, else saved_config's (the checkpoint's); a group's choice is
    .hydra/hydra.yaml's, else the saved overrides'.
    """
    config = _load_yaml(run / ".hydra" / "config.yaml")
    if not isinstance(config, dict):
        config = saved_config
    hydra = _load_yaml(run / ".hydra" / "hydra.yaml")
    choices = _lookup(hydra, "hydra.runtime.choices")
    saved = {}
    for entry in kept:
        o = _parse(entry)
        saved[o.key_or_group] = None if o.is_delete() else o.value()
    for arg in extra:
        o = _parse(arg)
        if o is None:
            raise ResumeError(f"resume={run}: {arg!r} is not a key=value override")
        key = o.key_or_group
        if key in SET_BY_RESUME:
            raise ResumeError(f"resume={run}: {arg} is set by resume itself (to the run's folder and last.ckpt)")
        if key in ON_RESUME or key.startswith("logger."):
            continue
        allowed = f"a resume may change only {', '.join(ON_RESUME)} and logger.*"
        if o.package is not None or o.is_sweep_override() or key.split(".")[0].split("/")[0] not in run_settings():
            raise ResumeError(f"resume={run}: {arg} is not a run setting to continue with; {allowed}")
        group = "/" in key or key in config_groups()
        if group and isinstance(choices, dict):
            before = choices.get(key, _UNSET)
        elif not group and isinstance(config, dict):
            before = _lookup(config, key)
        else:
            before = saved.get(key, _UNSET)
        after = _UNSET if o.is_delete() else o.value()
        if not _same(before, after):
            raise ResumeError(f"resume={run}: {arg.lstrip('+~')} differs from the run's {_shown(before)}; a resumed "
                              f"run keeps its settings — start a new run to change them ({allowed})")


def expand_argv(argv: list[str]) -> list[str]:
    """argv with resume=<dir> replaced by that run's overrides plus its checkpoint; unchanged without resume=."""
    hits = [a for a in argv[1:] if a.startswith("resume=")]
    if not hits:
        return argv
    if len(hits) > 1 or any(a in ("-m", "--multirun") for a in argv[1:]):
        raise ResumeError("resume= takes one run directory and no -m (resume each run of a sweep on its own)")
    run = Path(hits[0].split("=", 1)[1].strip("'\"")).expanduser().resolve()
    saved = run / ".hydra" / "overrides.yaml"
    ckpt = run / "checkpoints" / "last.ckpt"
    if not run.is_dir():
        raise ResumeError(f"resume={run}: no such directory")
    if not saved.is_file():
        raise ResumeError(f"resume={run}: not a run directory (no .hydra/overrides.yaml)")
    if not ckpt.is_file():
        raise ResumeError(f"resume={run}: no checkpoints/last.ckpt (killed before its first epoch ended); "
                          f"start the run again")
    from allconv import checkpoint
    from allconv.errors import CheckpointError

    try:
        saved_config = checkpoint.read(ckpt)["hyper_parameters"].get("config")
    except CheckpointError as e:
        raise ResumeError(f"resume={run}: {e}; delete it and start the run again "
                          f"(or restore an earlier copy of last.ckpt)") from None
    from allconv.run_folder import finished_metrics

    if finished_metrics(run) is not None:
        raise ResumeError(f"resume={run}: the run already finished (metrics.json); nothing to resume")
    entries = _load_yaml(saved)
    if not isinstance(entries, list):
        raise ResumeError(f"resume={run}: .hydra/overrides.yaml is not a list of overrides")
    extra = [a for a in argv[1:] if not a.startswith("resume=")]
    kept = [e for e in (_replayable(run, entry) for entry in entries) if e is not None]
    check_extra(run, extra, kept, saved_config if isinstance(saved_config, dict) else None)
    replaced = {_key(a) for a in extra}
    kept = [o for o in kept if _key(o) not in replaced]
    return [argv[0], *kept, *extra, f"ckpt_path={_quote(str(ckpt))}", f"hydra.run.dir={_quote(str(run))}",
            "hydra.mode=RUN"]


class EpochSeed(L.Callback):
    """Reseed the global RNG at each epoch start from (seed, epoch, rank), so a resumed epoch repeats exactly."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer, pl_module):
        torch.manual_seed((self.seed * 1_000_003 + trainer.current_epoch * 1_009 + trainer.global_rank) % 2**63)


class FitClock(L.Callback):
    """The run's training time summed over its launches: saved in each checkpoint, so a resumed run's
    wall_time_s is that of the whole run, not of its last launch. Work lost to an interruption (the epoch
    after the last checkpoint, redone by the resume) is not counted."""

    def __init__(self):
        self.before = 0.0  # the launches before this one, from the checkpoint
        self.start = None

    def on_fit_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return self.before + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict) -> None:
        elapsed = state_dict.get("elapsed_s")  # from a checkpoint that may come from elsewhere: a number or nothing
        ok = isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool) and math.isfinite(elapsed)
        self.before = float(elapsed) if ok and elapsed >= 0 else 0.0
