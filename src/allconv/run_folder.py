"""The run folder, the one model of it: what makes a folder a run, its state, its identity, what may continue it.

A folder holds a run of this project when it holds the project's record: `.hydra/` (Hydra's copy of the
composed config), `checkpoints/`, `metrics.json` or `identity.json`. Anything else in it (a log, notes) is the
user's: it does not make the folder a run and is never touched. The record is read without following links,
and each file is checked for its type and size before it is parsed, so a FIFO, a device, a link or a YAML
alias bomb is refused in one line instead of hanging a command:

    new          no record (absent, empty, or only the user's files): a new run may start here
    started      a record, no checkpoint, no result (stopped or failed before its first epoch ended):
                 its own command starts it again here
    interrupted  checkpoints/last.ckpt and no finished metrics.json: it continues from the checkpoint
    finished     metrics.json says "ok": never written again

A run's identity is its settings (the composed config without hydra) plus the fingerprint of the arrays it
trains on, recorded once in identity.json when it starts (record_identity; older folders: .hydra/config.yaml
and no fingerprint). Everything that continues a run — `resume=`, the long form with ckpt_path, a relaunched
sweep, a requeued job — compares its settings with that record by one rule, differences(): it may change only
what cannot change the run's result (CONTINUATION: the progress bar, printing, loggers, where the data lives)
or extend it as documented (trainer.max_epochs upward); the data must have the same fingerprint. A relaunched
sweep finds its runs by identity, not by job number (plan_sweep), so one more learning rate trains only the
new runs. Nothing here follows a link to write: a folder whose written paths are links is refused.

hold() takes an exclusive lock on the folder (flock on the directory itself: no lock file is written into
the run) for as long as the process trains it, so two processes cannot train one run. Where the filesystem
has no locks (ENOSYS, ENOLCK, EOPNOTSUPP: Lustre without flock, NFS without a lock daemon), one warning line
says that this guard is off and the run goes on. DDP ranks other than 0 share rank 0's folder, no lock.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from allconv.errors import ConfigError, ResumeError, RunFolderError
from allconv.files import NotRegularFile, file_kind, lock, read_regular, reason

HYDRA = ".hydra"
CHECKPOINT = Path("checkpoints") / "last.ckpt"
METRICS = "metrics.json"
IDENTITY = "identity.json"
RECORD = (HYDRA, "checkpoints", METRICS, IDENTITY)
# What a run writes below its folder: a link at any of these names would send a write outside the folder.
WRITTEN = (*RECORD, "csv", "learning_curve.png", "guided_backprop", "filters", "visualize", "wandb", "tensorboard",
           "fit-profiler.txt", "test-profiler.txt")
JOBS = "jobs.json"  # in a sweep folder: the folder of each job of the last launch, when a run moved number
MAX_BYTES = 4 << 20  # a record file is a few kB; a larger one is not this project's
MAX_DEPTH = 64  # nesting of a record (a config is 4 deep)

# -- the one rule: what a continuation may change --------------------------------------------------------
# Settings that only change how a run is watched, or where its data is read from (its fingerprint must match):
CONTINUATION = ("print_config", "callbacks.progress_bar", "callbacks.progress_bar_refresh",
                "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.profiler", "logger",
                "data.root", "data.path", "data.download", "data.verify_md5", "data.cache_dir")
RAISED = ("trainer.max_epochs",)  # a continuation may extend the run: raise it, never lower it
# Keys a newer version added, with the behaviour of the folders made before them (the key then "unset").
OLDER = {"model.final_weights": "init"}
ALLOWED = ("print_config, callbacks.progress_bar*, trainer.enable_progress_bar, trainer.enable_model_summary, "
           "trainer.profiler, logger*, where the data is (data.root, path, download, verify_md5, cache_dir; the same "
           "data) and trainer.max_epochs upward")
_UNSET = object()
_held: dict[Path, int] = {}  # folders this process holds the lock of -> their descriptor


# -- reading a record ----------------------------------------------------------------------------------
def read_bytes(path: Path, limit: int = MAX_BYTES) -> bytes | None:
    """A record file's bytes (None if absent), never through a link; RunFolderError for anything but a plain file
    of at most `limit` bytes (files.read_regular: a FIFO cannot block the read)."""
    path = Path(path)
    try:
        if path.is_symlink():
            raise RunFolderError(f"{path} is a symbolic link (to {os.readlink(path)}); a run's record holds plain "
                                 f"files")
        return read_regular(path, limit)
    except FileNotFoundError:
        return None
    except NotRegularFile as e:
        raise RunFolderError(f"{path} {e}; a run's record holds plain files") from None
    except OSError as e:
        raise RunFolderError(f"{path} cannot be read: {reason(e)}") from None


def _too_deep(node) -> bool:
    stack = [(node, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return False


def _parsed(path: Path, value):
    if _too_deep(value):
        raise RunFolderError(f"{path} is nested more than {MAX_DEPTH} levels deep; a record is not, refused")
    return value


def read_json(path: Path):
    """A record's JSON (None if absent); RunFolderError naming the file for anything else."""
    data = read_bytes(path)
    if data is None:
        return None
    try:
        return _parsed(path, json.loads(data))
    except (ValueError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path} is not JSON ({str(e)[:80]})") from None
    except RecursionError:
        raise RunFolderError(f"{path} is nested too deep to be a record; refused") from None


def read_yaml(path: Path):
    """A record's YAML as plain data (None if absent). Anchors and aliases are refused before anything is built:
    Hydra never writes them, and a few lines of aliases can expand to billions of nodes."""
    import yaml

    data = read_bytes(path)
    if data is None:
        return None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        text = data.decode()
        aliased = any(isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None)
                      for event in yaml.parse(text, Loader=loader))
        value = None if aliased else yaml.load(text, Loader=loader)
    except (yaml.YAMLError, UnicodeDecodeError, ValueError):
        raise RunFolderError(f"{path} is not YAML") from None
    except RecursionError:
        raise RunFolderError(f"{path} is nested too deep to be a record; refused") from None
    if aliased:
        raise RunFolderError(f"{path} holds YAML anchors or aliases; a saved config has none, refused")
    return _parsed(path, value)


def _lexists(path: Path) -> bool:
    try:
        os.lstat(path)
        return True
    except OSError:
        return False


def _plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


# -- what a folder holds -------------------------------------------------------------------------------
def is_run(run_dir: Path) -> bool:
    """The folder holds the project's record (not only the user's files)."""
    return any(_lexists(Path(run_dir) / name) for name in RECORD)


def finished_metrics(run_dir: Path) -> dict | None:
    """metrics.json of a finished run, or None (absent, damaged, not "ok")."""
    try:
        metrics = read_json(Path(run_dir) / METRICS)
    except RunFolderError:
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("status") == "ok" else None


def state(run_dir: Path) -> str:
    """new | started | interrupted | finished (the module's docstring)."""
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        return "new"
    if finished_metrics(run_dir) is not None:
        return "finished"
    return "interrupted" if _plain_file(run_dir / CHECKPOINT) else "started"


FOLDERS = (HYDRA, "checkpoints", "csv")
FILES = (METRICS, IDENTITY, str(CHECKPOINT))  # a figure that cannot be written is a warning, not a refusal


def check_links(run_dir: Path) -> None:
    """RunFolderError if a path the run writes (or one inside its record folders) is a link, or if a record path
    is of the wrong kind (a folder named metrics.json, a file named checkpoints): the run would fail at its end."""
    run_dir = Path(run_dir)
    for names, wanted, test in ((FOLDERS, "a folder", stat.S_ISDIR), (FILES, "a plain file", stat.S_ISREG)):
        for name in names:
            try:
                mode = os.lstat(run_dir / name).st_mode
            except OSError:
                continue
            if not stat.S_ISLNK(mode) and not test(mode):
                raise RunFolderError(f"{run_dir / name} is {file_kind(mode)}, not {wanted}; this is not a run folder "
                                     f"of this project: choose another folder")
    paths = [run_dir / name for name in WRITTEN]
    for sub in (HYDRA, "checkpoints", "csv"):
        folder = run_dir / sub
        if folder.is_dir() and not folder.is_symlink():
            paths += [Path(e.path) for e in os.scandir(folder)]
    for path in paths:
        if path.is_symlink():
            raise RunFolderError(f"{path} is a symbolic link (to {os.readlink(path)}); a run writes only inside its "
                                 f"own folder: replace the link by the file or folder it points to")


def check_outside_record(path: Path) -> None:
    """A folder another command writes into (visualize's out_dir): if it lies in a run folder, then outside that
    run's record and reached without a link; RunFolderError otherwise."""
    path = Path(os.path.abspath(path))
    for root in path.parents:
        if not is_run(root):
            continue
        parts = path.relative_to(root).parts
        if parts[0] in RECORD:
            raise RunFolderError(f"{path} is inside the record of the run {root} ({parts[0]}); a figure is written "
                                 f"beside it, e.g. {root / 'visualize'}")
        for i in range(1, len(parts) + 1):
            if (root.joinpath(*parts[:i])).is_symlink():
                raise RunFolderError(f"{root.joinpath(*parts[:i])} is a symbolic link; a figure of the run {root} is "
                                     f"written only inside its folder")
        return


# -- a run's identity and the one rule -----------------------------------------------------------------
def _flat(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict) and node:
        out: dict[str, object] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


def settings(cfg: DictConfig) -> dict[str, object]:
    """A run's settings: its composed config without hydra and ckpt_path, unresolved, as dotted keys."""
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "ckpt_path")])
    return _flat(OmegaConf.to_container(job, resolve=False))


def recorded_settings(run_dir: Path) -> dict[str, object] | None:
    """The settings the run started with: identity.json's, else .hydra/config.yaml's (older folders); None if
    neither exists. RunFolderError for a damaged one."""
    run_dir = Path(run_dir)
    identity = read_json(run_dir / IDENTITY)
    if identity is not None:
        if not (isinstance(identity, dict) and isinstance(identity.get("settings"), dict)):
            raise RunFolderError(f"{run_dir / IDENTITY} holds no settings; it is not this project's record")
        return identity["settings"]
    config = read_yaml(run_dir / HYDRA / "config.yaml")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise RunFolderError(f"{run_dir / HYDRA / 'config.yaml'} is not a config (a mapping of settings)")
    config.pop("ckpt_path", None)
    return _flat(config)


def may_change(key: str) -> bool:
    return key in CONTINUATION or any(key.startswith(k + ".") for k in CONTINUATION)


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _shown(value) -> str:
    from allconv.schema import shown

    return "unset" if value is _UNSET else shown(value)


def differences(recorded: dict, mine: dict, extend: bool = True) -> list[str]:
    """What `mine` changes of a recorded run's settings that a continuation may not change, as 'key old vs new'.
    extend=False: trainer.max_epochs too must be equal (two jobs of one sweep, a run found by identity)."""
    out = []
    for key in sorted(recorded.keys() | mine.keys()):
        if may_change(key):
            continue
        before, after = recorded.get(key, _UNSET), mine.get(key, _UNSET)
        if before is _UNSET and key in OLDER:  # a folder made before the key existed
            if not _same(after, OLDER[key]):
                out.append(f"{key}: the folder predates it and ran as {_shown(OLDER[key])}, "
                           f"pass {key}={_shown(OLDER[key])}")
            continue
        if extend and key in RAISED and isinstance(before, int) and isinstance(after, int) and after >= before:
            continue
        if not _same(before, after):
            out.append(f"{key} {_shown(before)} vs {_shown(after)}")
    return out


def data_fingerprint(cfg: DictConfig) -> str:
    """The fingerprint of the arrays cfg trains on (loads them)."""
    from allconv.data import CIFARDataModule

    return CIFARDataModule(**OmegaConf.to_container(cfg.data, resolve=True), seed=cfg.seed).fingerprint()


def _check_data(run_dir: Path, recorded: dict | None, fingerprint: str) -> None:
    saved = recorded.get("data") if isinstance(recorded, dict) else None
    if isinstance(saved, str) and saved != fingerprint:
        raise RunFolderError(f"{run_dir} holds a run on other data (its arrays' fingerprint {saved[:12]}, this "
                             f"command's data {fingerprint[:12]}); continue it on its own data (data.path, data.root)")


def record_identity(run_dir: Path, cfg: DictConfig, fingerprint: str) -> None:
    """At a run's start: write identity.json once; a run that has one must match it (a requeued job, a resume)."""
    from allconv.files import write_atomic

    run_dir = Path(run_dir)
    recorded = read_json(run_dir / IDENTITY)
    if recorded is None:
        identity = {"settings": settings(cfg), "data": fingerprint, "cwd": os.getcwd()}
        write_atomic(run_dir / IDENTITY, (json.dumps(identity, indent=1, default=str) + "\n").encode())
        return
    check_identity(run_dir, cfg)
    _check_data(run_dir, recorded, fingerprint)


def check_identity(run_dir: Path, cfg: DictConfig) -> None:
    """A job about to use run_dir (a relaunch, a requeue): the run recorded there is this job's run."""
    recorded = recorded_settings(run_dir) if _lexists(Path(run_dir) / IDENTITY) else None
    diff = differences(recorded, settings(cfg)) if recorded is not None else []
    if diff:
        raise RunFolderError(f"{run_dir} holds another run ({'; '.join(diff[:3])}); this job does not continue it")


def recorded_cwd(run_dir: Path) -> Path | None:
    """The working directory the run was started from (relative data paths are relative to it)."""
    for read, keys in ((lambda: read_json(run_dir / IDENTITY), ("cwd",)),
                       (lambda: read_yaml(run_dir / HYDRA / "hydra.yaml"), ("hydra", "runtime", "cwd"))):
        try:
            node = read()
        except RunFolderError:
            continue
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, str) and os.path.isabs(node):
            return Path(node)
    return None


# -- the lock ------------------------------------------------------------------------------------------
def is_secondary_rank() -> bool:
    """A DDP rank other than 0 of a job (Lightning's children, torchrun, or a SLURM task > 0)."""
    return any(int(os.environ.get(k) or 0) > 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def hold(run_dir: Path) -> None:
    """Lock run_dir for this process; ResumeError if another process holds it (it is training this run)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held or is_secondary_rank():
        return
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        lock(fd, run_dir, blocking=False,
             guards="nothing now stops a second process from training this run at the same time")
    except BlockingIOError:
        os.close(fd)
        raise ResumeError(f"{run_dir} is being trained by another process; wait for it to end "
                          f"(two processes cannot train one run)") from None
    except OSError:
        os.close(fd)
        raise
    _held[run_dir] = fd


def release(run_dir: Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the lock


# -- a single run: new, or its own continuation --------------------------------------------------------
def _same_file(a, b: Path) -> bool:
    try:
        return Path(str(a)).expanduser().resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def check_single_run(cfg: DictConfig) -> None:
    """RUN mode, before Hydra writes into hydra.run.dir: it is new, or this command continues its run (then held)."""
    if is_secondary_rank():
        return
    run_dir = Path(str(OmegaConf.select(cfg, "hydra.run.dir")))
    key = f"hydra.run.dir={str(run_dir)!r}"
    if run_dir.is_dir():
        check_links(run_dir)
    now = state(run_dir)
    if now == "new":
        return
    own_ckpt = bool(cfg.get("ckpt_path")) and _same_file(cfg.ckpt_path, run_dir / CHECKPOINT)
    if now == "finished":
        raise ConfigError(f"{key} already holds a finished run (metrics.json); a run is never overwritten: "
                          f"choose another hydra.run.dir (or leave it unset)")
    if now == "interrupted" and not own_ckpt:
        raise ConfigError(f"{key} already holds an interrupted run (checkpoints/last.ckpt); a run is never "
                          f"overwritten: continue it with: python src/train.py resume={run_dir}")
    recorded = recorded_settings(run_dir)
    if recorded is None or (now == "started" and cfg.get("ckpt_path")):
        raise ConfigError(f"{key} already holds files of another run; a run is never overwritten: choose another "
                          f"hydra.run.dir (or leave it unset)")
    diff = differences(recorded, settings(cfg))
    if diff:
        raise ConfigError(f"{key} holds a run with other settings ({'; '.join(diff[:3])}); a continuation keeps "
                          f"them and may change only {ALLOWED}: start a new run to change the rest")
    if _lexists(run_dir / IDENTITY):
        _check_data(run_dir, read_json(run_dir / IDENTITY), data_fingerprint(cfg))
    hold(run_dir)


# -- a sweep: each job's folder, found by identity -----------------------------------------------------
def sweep_job_dir(job: DictConfig, num: int) -> Path:
    """The folder the launcher gives job number `num` of a sweep (hydra.sweep.dir / hydra.sweep.subdir)."""
    from hydra.core.hydra_config import HydraConfig

    with open_dict(job):
        job.hydra.job.num = num
        job.hydra.job.id = str(num)
    HydraConfig.instance().set_config(job)  # ${hydra:...} in the subdir resolves as it will in the job
    return Path(str(job.hydra.sweep.dir)) / str(job.hydra.sweep.subdir)


def _runs_below(sweep: Path) -> dict[Path, dict | None]:
    """Every run folder directly below the sweep folder -> its recorded settings (None: damaged or absent)."""
    runs: dict[Path, dict | None] = {}
    if not sweep.is_dir():
        return runs
    for entry in sorted(os.scandir(sweep), key=lambda e: e.name):
        folder = Path(entry.path)
        if entry.is_dir(follow_symlinks=False) and is_run(folder):
            try:
                runs[folder] = recorded_settings(folder)
            except RunFolderError:
                runs[folder] = None
    return runs


def plan_sweep(config: DictConfig, jobs: list[tuple[int, DictConfig]]) -> dict[int, Path]:
    """MULTIRUN, before the first job: the folder of each job; one-line error before anything is written if two
    jobs would share a folder, if a job's folder holds another run or a link, or if a run it continues was trained
    on other data.

    A job continues the run of its identity wherever it is in the sweep folder (a relaunch with one more learning
    rate renumbers the jobs); only when such a run moved to another number is jobs.json written, which
    `${allconv.job_folder:...}` reads in each job to give it that folder.
    """
    sweep = Path(str(config.hydra.sweep.dir))
    default = {num: sweep_job_dir(job, num) for num, job in jobs}
    mine = {num: settings(job) for num, job in jobs}
    seen: dict[object, int] = {}
    for num, folder in default.items():
        if folder.is_symlink():
            raise RunFolderError(f"{folder} is a symbolic link (to {os.readlink(folder)}); a sweep writes only inside "
                                 f"its own folder: replace the link by the folder it points to")
        if folder in seen:
            raise ConfigError(f"jobs {seen[folder]} and {num} would share the folder {str(folder)!r}; name what "
                              f"differs between them in hydra.sweep.subdir (it holds one run)")
        seen[folder] = num
    runs = _runs_below(sweep)
    target: dict[int, Path] = {}
    for num in mine:  # a job's own folder first, then a run of the same identity that no job of this launch owns
        own = default[num]
        match = own if runs.get(own) is not None and not differences(runs[own], mine[num]) else next(
            (f for f in runs if f not in seen and runs[f] is not None and f not in target.values()
             and not differences(runs[f], mine[num], extend=False)), None)
        if match is not None:
            target[num] = match
    for num in mine:
        if num in target:
            continue
        own = default[num]
        if is_run(own) or own in target.values():
            recorded = runs.get(own)
            shown = "; ".join(differences(recorded, mine[num])[:3]) if recorded else "its record is damaged or absent"
            raise ConfigError(f"job {num}'s folder {str(own)!r} holds another run ({shown}); relaunch the sweep with "
                              f"its own settings, or choose another hydra.sweep.dir")
        target[num] = own
    fingerprints: dict[str, str] = {}  # one load per distinct data setting, not per job
    for num, folder in target.items():
        if folder.is_dir():
            check_links(folder)
        recorded = read_json(folder / IDENTITY) if folder in runs else None
        if isinstance(recorded, dict) and isinstance(recorded.get("data"), str):
            job = dict(jobs)[num]
            key = json.dumps(OmegaConf.to_container(job.data, resolve=True), sort_keys=True, default=str)
            if key not in fingerprints:
                fingerprints[key] = data_fingerprint(job)
            _check_data(folder, recorded, fingerprints[key])
    for name in ("multirun.yaml", JOBS):
        if (sweep / name).is_symlink():
            raise RunFolderError(f"{sweep / name} is a symbolic link (to {os.readlink(sweep / name)}); a sweep writes "
                                 f"only inside its own folder: remove the link")
    if any(target[num] != default[num] for num in target):
        from allconv.files import write_atomic

        names = {str(num): folder.name for num, folder in target.items()}
        write_atomic(sweep / JOBS, (json.dumps({"folders": names}, indent=1) + "\n").encode())
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra.append("hydra.sweep.subdir='${allconv.job_folder:${hydra.sweep.dir},"
                                                "${hydra.job.num}}'")  # quoted: the override grammar nests no ${}
        moved = [f"job {n} -> {target[n].name}" for n in target if target[n] != default[n]]
        print(f"relaunch: {len(moved)} job(s) continue their run under another number ({', '.join(moved[:4])}"
              f"{', ...' if len(moved) > 4 else ''})", file=sys.stderr, flush=True)
    return target


def _job_folder(sweep_dir: str, num) -> str:
    """The resolver behind ${allconv.job_folder:...}: the folder name plan_sweep chose for job `num`."""
    path = Path(str(sweep_dir)) / JOBS
    names = read_json(path)
    name = names.get("folders", {}).get(str(num)) if isinstance(names, dict) else None
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise RunFolderError(f"{path} names no folder for job {num}; relaunch the sweep")
    return name


def register_resolver() -> None:
    if not OmegaConf.has_resolver("allconv.job_folder"):
        OmegaConf.register_new_resolver("allconv.job_folder", _job_folder, use_cache=False)


def failed_jobs(target: dict[int, Path]) -> list[str]:
    """The jobs of a sweep whose metrics.json says "failed", each as 'job N (<folder>): <error>'."""
    out = []
    for num, folder in sorted(target.items()):
        try:
            metrics = read_json(folder / METRICS)
        except RunFolderError:
            metrics = None
        if isinstance(metrics, dict) and metrics.get("status") == "failed":
            out.append(f"job {num} ({folder.name}): {str(metrics.get('error', ''))[:200]}")
    return out


class Plan(NamedTuple):
    action: str  # train | resume | skip
    ckpt_path: str | None = None
    metrics: dict | None = None
    note: str = ""


def plan_sweep_job(run_dir: Path) -> Plan:
    """What a multirun job does with its folder: skip a finished run, continue an interrupted one, else train."""
    now = state(run_dir)
    if now == "finished":
        metrics = finished_metrics(run_dir) or {}
        error = metrics.get("test_error")
        shown = f"test error {error:.4f}" if isinstance(error, float) and math.isfinite(error) else "finished"
        return Plan("skip", metrics=metrics, note=f"{run_dir}: already finished ({shown}); skipped")
    if now == "interrupted":
        from allconv import checkpoint

        ckpt = run_dir / CHECKPOINT
        saved = checkpoint.read(ckpt)  # a damaged one is a CheckpointError naming it
        return Plan("resume", str(ckpt), note=f"{run_dir}: continuing from {CHECKPOINT} "
                                              f"(epoch {saved.get('epoch')}, global step {saved.get('global_step')})")
    return Plan("train")
