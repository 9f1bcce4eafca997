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

Where the run read its data and cached its whitening (data.root, data.download, data.cache_dir) is not
replayed: a folder never chooses where a command writes (a download, the ZCA cache). A relative data.path
is made absolute against the folder the run was started from (identity.json's cwd), so a resume from
another working directory reads the run's own file. A run stopped before its first checkpoint is started
again in its folder (no ckpt_path).

A resumed run keeps its settings: what the command may change is the one rule of allconv.run_folder
(run_folder.differences: the progress bar, printing, loggers, where the data is, trainer.max_epochs upward),
which the pre-flight applies to the composed config of this command, as it does for the long form
(ckpt_path=... hydra.run.dir=...) and a relaunched sweep. Everything is checked before Hydra writes, so a
refused resume leaves the folder as it was; run_folder.hold() then keeps a second resume of the same run out.

Lightning's checkpoint restores weights, optimiser, schedule and loop counters but not the random
state, so callbacks.EpochSeed reseeds the global RNG (dropout) at the start of every epoch from (seed,
epoch, rank): a resumed run then draws what the uninterrupted run would have drawn, and ends with
the same weights. The data order is already a function of (seed, epoch) (data.DeviceLoader).
callbacks.FitClock carries the training time in the checkpoint, so metrics.json's wall_time_s is the run's, over all
its launches.
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path

from allconv.errors import ResumeError

CONF = Path(__file__).resolve().parents[2] / "conf"
SET_BY_RESUME = ("ckpt_path", "hydra.run.dir", "hydra.mode")
# Where the run read its data and cached its whitening: places the folder must not choose for a write
# (a download, the ZCA cache); the command's own (or the defaults) apply, and the data's fingerprint must match.
NOT_REPLAYED = ("data.root", "data.download", "data.cache_dir")


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


def expand_argv(argv: list[str]) -> list[str]:
    """argv with resume=<dir> replaced by that run's overrides plus its checkpoint; unchanged without resume=."""
    hits = [a for a in argv[1:] if a.startswith("resume=")]
    if not hits:
        return argv
    if len(hits) > 1 or any(a in ("-m", "--multirun") for a in argv[1:]):
        raise ResumeError("resume= takes one run directory and no -m (resume each run of a sweep on its own)")
    from allconv import run_folder
    from allconv.errors import RunFolderError

    run = Path(hits[0].split("=", 1)[1].strip("'\"")).expanduser().resolve()
    if not run.is_dir():
        raise ResumeError(f"resume={run}: no such directory")
    try:
        entries = run_folder.read_yaml(run / ".hydra" / "overrides.yaml")
    except RunFolderError as e:
        raise ResumeError(f"resume={run}: {e}") from None
    if entries is None:
        raise ResumeError(f"resume={run}: not a run directory (no .hydra/overrides.yaml)")
    now = run_folder.state(run)
    if now == "finished":
        raise ResumeError(f"resume={run}: the run already finished (metrics.json); nothing to resume")
    ckpt = run / run_folder.CHECKPOINT
    if now == "interrupted":
        from allconv import checkpoint
        from allconv.errors import CheckpointError

        try:
            checkpoint.read(ckpt)
        except CheckpointError as e:
            raise ResumeError(f"resume={run}: {e}; delete it and start the run again "
                              f"(or restore an earlier copy of last.ckpt)") from None
    if not isinstance(entries, list):
        raise ResumeError(f"resume={run}: .hydra/overrides.yaml is not a list of overrides")
    extra = [a for a in argv[1:] if not a.startswith("resume=")]
    for arg in extra:
        if _key(arg) in SET_BY_RESUME:
            raise ResumeError(f"resume={run}: {arg} is set by resume itself (to the run's folder and last.ckpt)")
    kept = [e for e in (_replayable(run, entry) for entry in entries) if e is not None]
    replaced = {_key(a) for a in extra}
    kept = [o for o in kept if _key(o) not in replaced and _key(o) not in NOT_REPLAYED]
    data_path = _data_path(run) if "data.path" not in replaced else None
    if data_path is not None:
        kept = [o for o in kept if _key(o) != "data.path"] + [f"data.path={_quote(data_path)}"]
    if now != "interrupted":
        print(f"resume={run}: no checkpoint yet (stopped before its first epoch ended): starting the run again in "
              f"its folder", file=sys.stderr, flush=True)
    return [argv[0], *kept, *extra, *([f"ckpt_path={_quote(str(ckpt))}"] if now == "interrupted" else []),
            f"hydra.run.dir={_quote(str(run))}", "hydra.mode=RUN"]


def _data_path(run: Path) -> str | None:
    """The run's data.path made absolute against the folder it was started from, when it was relative."""
    from allconv import run_folder
    from allconv.errors import RunFolderError

    try:
        path = (run_folder.recorded_settings(run) or {}).get("data.path")
    except RunFolderError:
        return None
    cwd = run_folder.recorded_cwd(run)
    if not isinstance(path, str) or not path or "${" in path or os.path.isabs(path) or path.startswith("~") \
            or cwd is None:
        return None
    return str(cwd / path)
