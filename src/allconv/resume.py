"""Resume a killed run from its last checkpoint: python src/train.py resume=<run dir> [key=value ...].

expand_argv() turns resume=<dir> into the run's own command line: the overrides its identity.json records
(allconv.run_record; rebuilt from the checkpoint's copy when it is missing), ckpt_path=<dir>/checkpoints/last.ckpt
and hydra.run.dir=<dir>, in run mode. The run continues in the same folder and writes the metrics.json it would
have written. The overrides were recorded with their values resolved (replayable()), so an `${oc.env:...}` the run
was started with replays as the value it had then, whatever the environment of the resume.

A run folder may come from elsewhere, so its recorded overrides are data, not a command line: resume replays
only the project's own settings (run_settings(): the top-level keys and config groups of conf/train.yaml, i.e.
model, data, optim, trainer, logger, callbacks, experiment, debug, seed, print_config). An entry that sets
anything of Hydra's (hydra.*, hydra/...: callbacks, launchers, sweepers, logging, all of which Hydra builds or
runs), that places a config under another package (@), that holds `_target_` or an interpolation `${...}`, or a
sweep, is refused with one line before anything is written. ckpt_path, hydra.run.dir and hydra.mode are resume's.

Where the run read its data and cached its whitening (data.root, data.download, data.cache_dir) is not
replayed: a folder never chooses where a command writes (a download, the ZCA cache). A relative data.path
is made absolute against the folder the run was started from (identity.json's cwd), so a resume from
another working directory reads the run's own file. A run stopped before its first checkpoint is started
again in its folder (no ckpt_path).

A resumed run keeps its settings: what the command may change is the one rule of allconv.run_folder
(continuation_errors: the progress bar, printing, loggers, where the data is, trainer.max_epochs upward, held
against identity.json and the checkpoint's own saved settings), which the pre-flight applies to the composed
config of this command, as it does for the long form (ckpt_path=... hydra.run.dir=...) and a relaunched sweep.
Everything is checked before anything is written, so a refused resume leaves the folder as it was;
RunFolder.hold() then keeps a second resume of the same run out.
"""

from __future__ import annotations

import math
import os
import re
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
    """value as a quoted override, never an interpolation (a literal ${ is escaped: a folder's name is data); Hydra
    keeps backslashes except those before a quote (the closing one too)."""
    out = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value.replace("${", "\\${"))
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, out) + "'"


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
        return ResumeError(f"resume={run}: identity.json override {str(entry)!r} {why}; resume replays only "
                           f"the run's own settings ({_allowed()}), never hydra.*, _target_ or ${{...}}")

    if not isinstance(entry, str):
        raise refuse("is not a key=value override")
    if _key(entry) in SET_BY_RESUME:
        return None
    if re.search(r"(?<!\\)\$\{", entry):  # replayable() escapes a literal ${ as \${
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
    from allconv import run_record as rr
    from allconv.errors import AllConvError
    from allconv.run_folder import RunFolder

    run = Path(hits[0].split("=", 1)[1].strip("'\"")).expanduser().resolve()
    if not run.is_dir():
        raise ResumeError(f"resume={run}: no such directory")
    folder = RunFolder(run)
    folder.check_links()  # a record read through a link would be another folder's
    now = folder.state()
    if now == rr.NEW:
        raise ResumeError(f"resume={run}: not a run directory (no identity.json, checkpoints/ or metrics.json)")
    if now == rr.FINISHED:
        raise ResumeError(f"resume={run}: the run already finished (metrics.json); nothing to resume")
    if now == rr.DIVERGED:
        raise ResumeError(f"resume={run}: the run diverged (metrics.json: {_said(folder)}); it would diverge again: "
                          f"start a new run with other settings")
    try:
        copy = folder.saved_identity()  # reads the checkpoint: a damaged one is refused here, naming it
    except AllConvError as e:
        raise ResumeError(f"resume={run}: {e}; delete it and start the run again "
                          f"(or restore an earlier copy of last.ckpt)") from None
    try:
        identity = folder.read_identity() or copy
    except AllConvError as e:
        raise ResumeError(f"resume={run}: {e}") from None
    if identity is None:
        raise ResumeError(f"resume={run}: the run records no identity.json (it was started by an older allconv); "
                          f"continue it with its own command plus ckpt_path={folder.checkpoint} hydra.run.dir={run}")
    if identity.get("format", 1) != rr.IDENTITY_FORMAT:
        raise ResumeError(f"resume={run}: its identity.json records no overrides (it was started by an older "
                          f"allconv); continue it with its own command plus ckpt_path={folder.checkpoint} "
                          f"hydra.run.dir={run}")
    extra = [a for a in argv[1:] if not a.startswith("resume=")]
    for arg in extra:
        if _key(arg) in SET_BY_RESUME:
            raise ResumeError(f"resume={run}: {arg} is set by resume itself (to the run's folder and last.ckpt)")
    kept = [e for e in (_replayable(run, entry) for entry in identity["overrides"]) if e is not None]
    replaced = {_key(a) for a in extra}
    kept = [o for o in kept if _key(o) not in replaced and _key(o) not in NOT_REPLAYED]
    data_path = _data_path(identity) if "data.path" not in replaced else None
    if data_path is not None:
        kept = [o for o in kept if _key(o) != "data.path"] + [f"data.path={_quote(data_path)}"]
    resumed = os.path.isfile(folder.checkpoint)
    if not resumed:
        print(f"resume={run}: no checkpoint yet (stopped before its first epoch ended): starting the run again in "
              f"its folder", file=sys.stderr, flush=True)
    return [argv[0], *kept, *extra, *([f"ckpt_path={_quote(str(folder.checkpoint))}"] if resumed else []),
            f"hydra.run.dir={_quote(str(run))}", "hydra.mode=RUN"]


def _said(folder) -> str:
    try:
        return str((folder.outcome() or {}).get("error", ""))[:160]
    except Exception:
        return "unreadable"


def _data_path(identity: dict) -> str | None:
    """The run's data.path made absolute against the folder it was started from, when it was relative."""
    path, cwd = identity["settings"].get("data.path"), identity.get("cwd")
    if not isinstance(path, str) or not path or "${" in path or os.path.isabs(path) or path.startswith("~") \
            or not isinstance(cwd, str) or not os.path.isabs(cwd):
        return None
    return str(Path(cwd) / path)


# -- the record's side: the overrides a run is started with, in the form resume replays ------------------------
def _literal(value) -> str:
    """A resolved value in Hydra's override grammar; a string is quoted and a literal ${ escaped (never resolved)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                          ("inf" if value > 0 else "-inf"))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_literal(v)}" for k, v in value.items()) + "}"
    return _quote(str(value))


def replayable(task_overrides: list[str], cfg) -> list[str]:
    """The command line's overrides as a run records them: a key's value replaced by what it resolved to in cfg
    (a group choice, a deletion and anything resume would refuse are kept as given, and refused then)."""
    from omegaconf import OmegaConf

    out = []
    for entry in task_overrides:
        o = _parse(entry)
        key = o.key_or_group if o is not None else None
        if o is None or o.is_delete() or o.package is not None or o.is_sweep_override() or \
                (CONF / key.replace(".", "/")).is_dir() or key.split(".")[0].split("/")[0] == "hydra":
            out.append(entry)
            continue
        node = OmegaConf.select(cfg, key, throw_on_missing=False)
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        prefix = "++" if o.is_force_add() else "+" if o.is_add() else ""
        out.append(f"{prefix}{key}={_literal(value)}")
    return out
