"""The run folder, one object: every path in it, its state, and the one rule for what may continue the run in it.

A folder holds a run of this project when it holds the project's record (allconv.run_record): identity.json,
checkpoints/ or metrics.json. Anything else in it (a log, notes, an empty folder Hydra made) is the user's: it
does not make the folder a run and is never touched. Its state is one of run_record's words (new, started,
interrupted, failed, diverged, finished).

Everything that continues a run — `resume=`, the long form with ckpt_path, a relaunched sweep, a requeued job —
asks continuation_errors(): the command's resolved settings are held against identity.json AND against the
checkpoint's own saved settings (and its copy of identity.json); a continuation may change only what cannot
change the result (CONTINUATION) or extend it as documented (trainer.max_epochs upward), and its data must
have the run's fingerprint. identity.json and the checkpoint must agree with each other: a record that was
edited is refused, one that is missing or damaged is rebuilt from the checkpoint's copy.

hold() locks the folder (flock on the directory itself, no lock file in the run) while a process trains it;
DDP ranks other than 0 share rank 0's folder, no lock.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from allconv import run_record as rr
from allconv.errors import ConfigError, ResumeError, RunFolderError
from allconv.files import file_kind, lock_folder

# -- the one rule: what a continuation may change --------------------------------------------------------
CONTINUATION = ("print_config", "callbacks.progress_bar", "callbacks.progress_bar_refresh", "model.channels_last",
                "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.profiler", "logger", "tags",
                "data.root", "data.path", "data.download", "data.verify_md5", "data.cache_dir")
RAISED = ("trainer.max_epochs",)  # a continuation may extend the run: raise it, never lower it
# Keys a newer version added, with the behaviour of the folders made before them (the key then "unset").
OLDER = {"model.final_weights": "init"}
ALLOWED = f"{', '.join(CONTINUATION)} (the data in another place, not other data) and trainer.max_epochs upward"
# What makes a folder a sweep's (allconv.sweep_folder): Hydra's record of the launch, and the job folders when a
# relaunched run moved number.
JOBS = "jobs.json"
SWEEP_FILES = ("multirun.yaml", JOBS)
_UNSET = object()
_held: dict[Path, int] = {}  # folders this process holds the lock of -> their descriptor


class RunFolder:
    """One run's folder and every path in it; nothing else builds a path into a run folder."""

    RECORD_FILES = ("metrics.json", "identity.json")
    RECORD = ("checkpoints", *RECORD_FILES)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- the record
    identity = property(lambda self: self.path / "identity.json")
    metrics = property(lambda self: self.path / "metrics.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    checkpoint = property(lambda self: self.path / "checkpoints" / "last.ckpt")
    # -- what a run writes beside it
    csv = property(lambda self: self.path / "csv")
    metrics_csv = property(lambda self: self.path / "csv" / "metrics.csv")
    learning_curve = property(lambda self: self.path / "learning_curve.png")
    guided_backprop = property(lambda self: self.path / "guided_backprop")
    filters = property(lambda self: self.path / "filters")
    visualize = property(lambda self: self.path / "visualize")
    wandb = property(lambda self: self.path / "wandb")
    wandb_id = property(lambda self: self.path / "wandb_run_id.txt")  # the one W&B run of all its launches
    tensorboard = property(lambda self: self.path / "tensorboard")
    profiler_name = "profiler"  # Lightning's profilers write <stage>-profiler.txt
    FOLDERS = ("checkpoints", "csv")
    FILES = ("metrics.json", "identity.json", "checkpoints/last.ckpt")  # a figure that fails is a warning only
    WRITTEN = (*RECORD, "csv", "learning_curve.png", "guided_backprop", "filters", "visualize", "wandb",
               "wandb_run_id.txt", "tensorboard", "fit-profiler.txt", "test-profiler.txt")

    @classmethod
    def of_checkpoint(cls, ckpt_path: str | Path) -> RunFolder:
        """The folder a checkpoint file lies in (<run>/checkpoints/last.ckpt, else the file's own folder)."""
        parent = Path(ckpt_path).parent
        return cls(parent.parent if parent.name == "checkpoints" else parent)

    # -- what it holds
    def is_run(self) -> bool:
        return any(os.path.lexists(self.path / name) for name in self.RECORD)

    def outcome(self) -> dict | None:
        """metrics.json (None if absent); RunFolderError if it cannot be read."""
        return rr.read_outcome(self.metrics)

    def finished(self) -> dict | None:
        return rr.finished(self.metrics)

    def state(self) -> str:
        if not self.is_run():
            return rr.NEW
        try:
            status = rr.status_of(self.outcome())
        except RunFolderError:
            status = None  # a result that does not parse is no result
        if status in (rr.FINISHED, rr.DIVERGED):
            return status
        if _plain_file(self.checkpoint):
            return rr.INTERRUPTED if status in (None, rr.INTERRUPTED) else status
        return rr.FAILED if status == rr.FAILED else rr.STARTED

    def read_identity(self) -> dict | None:
        return rr.read_identity(self.identity)

    def saved_identity(self) -> dict | None:
        """The checkpoint's copy of identity.json (None: no checkpoint, or one from before the copy)."""
        if not _plain_file(self.checkpoint):
            return None
        from allconv import checkpoint

        saved = (checkpoint.read(self.checkpoint).get("callbacks") or {}).get("RunIdentity")
        return None if saved is None else rr.check_identity(self.checkpoint, saved)

    def write_outcome(self, record: dict) -> None:
        """metrics.json, unless it already says the run finished: a result is never replaced by a later failure."""
        if record.get("status") != rr.FINISHED and self.finished() is not None:
            return
        rr.write_json(self.metrics, record)

    # -- links and kinds
    def check_links(self) -> None:
        """RunFolderError if a path the run writes (or one inside its record folders) is a link, or if a record path
        is of the wrong kind (a folder named metrics.json, a file named checkpoints)."""
        if self.path.is_symlink():
            raise RunFolderError(f"{self.path} is a symbolic link (to {os.readlink(self.path)}); a run is written "
                                 f"only into a real folder: use the folder it points to")
        for names, wanted, test in ((self.FOLDERS, "a folder", stat.S_ISDIR), (self.FILES, "a plain file",
                                                                              stat.S_ISREG)):
            for name in names:
                try:
                    mode = os.lstat(self.path / name).st_mode
                except OSError:
                    continue
                if not stat.S_ISLNK(mode) and not test(mode):
                    raise RunFolderError(f"{self.path / name} is {file_kind(mode)}, not {wanted}; this is not a run "
                                         f"folder of this project: choose another folder")
        paths = [self.path / name for name in self.WRITTEN]
        for sub in self.FOLDERS:
            folder = self.path / sub
            if folder.is_dir() and not folder.is_symlink():
                paths += [Path(e.path) for e in os.scandir(folder)]
        for path in paths:
            if path.is_symlink():
                raise RunFolderError(f"{path} is a symbolic link (to {os.readlink(path)}); a run writes only inside "
                                     f"its own folder: replace the link by the file or folder it points to")

    # -- the lock
    def hold(self) -> None:
        """Lock the folder for this process; ResumeError if another process holds it (it is training this run)."""
        path = self.path.resolve()
        if path in _held or is_secondary_rank():
            return
        try:
            _held[path] = lock_folder(path, "nothing now stops a second process from training this run at the "
                                            "same time")
        except BlockingIOError:
            raise ResumeError(f"{path} is being trained by another process; wait for it to end "
                              f"(two processes cannot train one run)") from None

    def release(self) -> None:
        fd = _held.pop(self.path.resolve(), None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock


def _plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_secondary_rank() -> bool:
    """A DDP rank other than 0 of a job (Lightning's children, torchrun, or a SLURM task > 0)."""
    return any(int(os.environ.get(k) or 0) > 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def check_outside_record(path: Path) -> None:
    """A folder another command writes into (visualize's out_dir): if it lies in a run folder, then outside that
    run's record and reached without a link; RunFolderError otherwise."""
    path = Path(os.path.abspath(path))
    for root in path.parents:
        if not RunFolder(root).is_run():
            continue
        parts = path.relative_to(root).parts
        if parts[0] in RunFolder.RECORD:
            raise RunFolderError(f"{path} is inside the record of the run {root} ({parts[0]}); a figure is written "
                                 f"beside it, e.g. {RunFolder(root).visualize}")
        for i in range(1, len(parts) + 1):
            if (root.joinpath(*parts[:i])).is_symlink():
                raise RunFolderError(f"{root.joinpath(*parts[:i])} is a symbolic link; a figure of the run {root} is "
                                     f"written only inside its folder")
        return


# -- settings and the one rule ---------------------------------------------------------------------------
def settings(cfg: DictConfig, resolve: bool = True) -> dict[str, object]:
    """A run's settings: its composed config without hydra and ckpt_path, resolved, as dotted keys. An
    interpolation that cannot be resolved is one ConfigError naming the key."""
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "ckpt_path")])
    try:
        return rr.flat(OmegaConf.to_container(job, resolve=resolve))
    except Exception as e:  # an unset environment variable, a resolver that fails
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"a setting cannot be resolved: {first}") from None


def may_change(key: str) -> bool:
    return key in CONTINUATION or any(key.startswith(k + ".") for k in CONTINUATION)


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
            if not rr.same(after, OLDER[key]):
                out.append(f"{key}: the folder predates it and ran as {_shown(OLDER[key])}, "
                           f"pass {key}={_shown(OLDER[key])}")
            continue
        if after is _UNSET and key not in declared_keys():  # a key this version removed
            out.append(f"{key}: the run set it to {_shown(before)} and this version of allconv has no such setting; "
                       f"continue the run with the version that made it")
            continue
        if extend and key in RAISED and isinstance(before, int) and isinstance(after, int) and after >= before:
            continue
        if not rr.same(before, after):
            out.append(f"{key} {_shown(before)} vs {_shown(after)}")
    return out


def declared_keys() -> set[str]:
    from allconv import schema

    return schema.declared(schema.TrainConfig)


def continuation_errors(folder: RunFolder, cfg: DictConfig, extend: bool = True) -> list[str]:
    """Why cfg may not continue the run in folder ([] if it may): held against identity.json, against the
    checkpoint's saved settings, and the two against each other."""
    identity = folder.read_identity()
    copy = folder.saved_identity()
    if identity is not None and copy is not None:
        for key in ("data", "inputs", "precision"):
            if identity.get(key) != copy.get(key):
                return [f"identity.json's {key} disagrees with the run's checkpoint; the record was edited: delete "
                        f"{folder.identity} to rebuild it from the checkpoint"]
        edited = differences(copy["settings"], identity["settings"], extend=False)
        if edited:
            return [f"identity.json disagrees with the run's checkpoint ({edited[0]}); the record was edited: delete "
                    f"{folder.identity} to rebuild it from the checkpoint"]
    record = identity or copy
    mine = settings(cfg, resolve=record is None or record.get("format", 1) == rr.IDENTITY_FORMAT)
    errors = differences(record["settings"], mine, extend) if record is not None else []
    if not errors and _plain_file(folder.checkpoint):  # the checkpoint's own saved config: what it trained with
        from allconv import checkpoint

        saved = checkpoint.config(checkpoint.read(folder.checkpoint))
        saved = rr.flat({k: v for k, v in OmegaConf.to_container(saved, resolve=False).items()
                         if k not in ("hydra", "ckpt_path")})
        resolved = settings(cfg)
        errors = differences({k: v for k, v in saved.items() if k in resolved or k not in OLDER}, resolved, extend)
    return errors


def check_job(folder: RunFolder, cfg: DictConfig) -> None:
    """A job about to use folder (a relaunch, a requeue, a jobs.json edited since the launch): the run recorded
    there is this job's run."""
    errors = continuation_errors(folder, cfg) if folder.is_run() else []
    if errors:
        raise RunFolderError(f"{folder.path} holds another run ({'; '.join(errors[:3])}); this job does not continue "
                             f"it")


def check_data(folder: RunFolder, recorded: dict | None, fingerprint: str, key: str = "data") -> None:
    saved = recorded.get(key) if isinstance(recorded, dict) else None
    if isinstance(saved, str) and saved != fingerprint:
        what = "arrays" if key == "data" else "whitened inputs (arrays, preprocessing and its fit)"
        raise RunFolderError(f"{folder.path} holds a run on other data (its {what}' fingerprint {saved[:12]}, this "
                             f"command's {fingerprint[:12]}); continue it on its own data (data.path, data.root, "
                             f"data.cache_dir)")


def data_fingerprint(cfg: DictConfig) -> str:
    """The fingerprint of the arrays cfg trains on (loads them)."""
    from allconv.data import CIFARDataModule

    return CIFARDataModule(**OmegaConf.to_container(cfg.data, resolve=True), seed=cfg.seed).fingerprint()


def record(folder: RunFolder, identity: dict) -> dict:
    """At a run's start: the identity it trains under. A new run writes identity.json once; a continuation
    must match the record (and rebuilds a missing or damaged one from its checkpoint's copy, saying so)."""
    try:
        recorded = folder.read_identity()
    except RunFolderError as e:
        recorded, damaged = None, str(e)
    else:
        damaged = ""
    copy = folder.saved_identity()
    if recorded is None and copy is not None:
        print(f"warning: {folder.identity} {'is damaged (' + damaged + ')' if damaged else 'is missing'}; rebuilt "
              f"from the run's checkpoint", file=sys.stderr, flush=True)
        rr.write_json(folder.identity, copy)
        recorded = copy
    elif damaged:
        raise RunFolderError(damaged)
    if recorded is None:
        rr.write_json(folder.identity, identity)
        return identity
    for key in ("data", "inputs"):
        check_data(folder, recorded, identity[key], key)
    if isinstance(recorded.get("fit"), list) and not rr.same_fit(recorded["fit"], identity["fit"]):
        raise RunFolderError(f"{folder.path} holds a run whitened by another preprocessing fit than the one this "
                             f"command loaded (data.cache_dir holds another fit for these images); continue it with "
                             f"the cache it was trained with, or an empty data.cache_dir to fit again")
    return recorded  # an older record (format 1) is kept as it is, and carried so by the checkpoint


def recorded_precision(folder: RunFolder, cuda: bool) -> str | None:
    """The precision the run in folder trains in (None: a new run). A record from before the precision was recorded
    ran in what trainer.precision=auto meant then: bf16-mixed on CUDA, 32-true elsewhere."""
    for read in (folder.read_identity, folder.saved_identity):
        try:
            identity = read()
        except Exception:
            continue
        if identity is not None:
            return identity["precision"] if isinstance(identity.get("precision"), str) else \
                ("bf16-mixed" if cuda else "32-true")
    return None


# -- a single run: new, or its own continuation -----------------------------------------------------------
def _same_file(a, b: Path) -> bool:
    try:
        return Path(str(a)).expanduser().resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def check_single_run(cfg: DictConfig) -> None:
    """RUN mode, before anything is written into hydra.run.dir: it is new, or this command continues its run."""
    if is_secondary_rank():
        return
    folder = RunFolder(str(OmegaConf.select(cfg, "hydra.run.dir")))
    key = f"hydra.run.dir={str(folder.path)!r}"
    if folder.path.is_dir() or folder.path.is_symlink():
        folder.check_links()
    if any(os.path.lexists(folder.path / name) for name in SWEEP_FILES):
        raise ConfigError(f"{key} is a sweep folder (it holds {' or '.join(SWEEP_FILES)}); a single run gets a "
                          f"folder of its own: choose another hydra.run.dir")
    now = folder.state()
    if now == rr.NEW:
        return
    own_ckpt = bool(cfg.get("ckpt_path")) and _same_file(cfg.ckpt_path, folder.checkpoint)
    if now == rr.FINISHED:
        raise ConfigError(f"{key} already holds a finished run (metrics.json); a run is never overwritten: "
                          f"choose another hydra.run.dir (or leave it unset)")
    if now == rr.DIVERGED:
        raise ConfigError(f"{key} holds a run that diverged (metrics.json); it would diverge again: start a new run "
                          f"with other settings in another hydra.run.dir")
    if _plain_file(folder.checkpoint) and not own_ckpt:
        raise ConfigError(f"{key} already holds an interrupted run (checkpoints/last.ckpt); a run is never "
                          f"overwritten: continue it with: python src/train.py resume={folder.path}")
    if (not _plain_file(folder.checkpoint) and cfg.get("ckpt_path")) or \
            (folder.read_identity() is None and folder.saved_identity() is None and not own_ckpt):
        raise ConfigError(f"{key} already holds files of another run; a run is never overwritten: choose another "
                          f"hydra.run.dir (or leave it unset)")
    diff = continuation_errors(folder, cfg)
    if diff:
        raise ConfigError(f"{key} holds a run with other settings ({'; '.join(diff[:3])}); a continuation keeps "
                          f"them and may change only {ALLOWED}: start a new run to change the rest")
    identity = folder.read_identity() or folder.saved_identity()
    check_data(folder, identity, data_fingerprint(cfg))
    folder.hold()
