"""A sweep folder: the folder of each job, found by identity, planned under a lock; a job's plan; the failed jobs.

A relaunched sweep finds its runs by identity, not by job number (plan()), so one more learning rate trains only
the new runs; when a run moved to another number, jobs.json names each job's folder and `${allconv.job_folder:...}`
gives it to the job. The plan is made under an exclusive lock on the sweep folder, held until the sweep ends, so
two launches of one sweep cannot plan (and then train) the same folders: the second is refused in one line.
Every job folder is a real folder directly inside the sweep folder, never a link. A job refused when it starts
(its folder now holds another run, is a link, or is being trained) cannot write into that folder: it leaves
`refused-job-<N>.txt` in the sweep folder, and the sweep's exit status counts it as failed.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from allconv import run_record as rr
from allconv.errors import ConfigError, RunFolderError
from allconv.files import lock_folder, write_atomic
from allconv.run_folder import (
    JOBS,
    SWEEP_FILES,
    RunFolder,
    check_data,
    continuation_errors,
    data_fingerprint,
    differences,
    settings,
)

_held: dict[Path, int] = {}


def refusal_note(sweep: Path, num) -> Path:
    return Path(sweep) / f"refused-job-{num}.txt"


def job_dir(job: DictConfig, num: int) -> Path:
    """The folder the launcher gives job number `num` (hydra.sweep.dir / hydra.sweep.subdir), its config set as
    the job's own so that ${hydra:...} in its values resolves as it will in the job."""
    from hydra.core.hydra_config import HydraConfig

    with read_write(job.hydra), open_dict(job.hydra):  # set_config makes it read-only: a job is placed again later
        job.hydra.job.num = num
        job.hydra.job.id = str(num)
    HydraConfig.instance().set_config(job)
    return Path(str(job.hydra.sweep.dir)) / str(job.hydra.sweep.subdir)


def _hold(sweep: Path) -> None:
    """The sweep folder locked by this launch until it ends; ConfigError if another launch holds it."""
    sweep.mkdir(parents=True, exist_ok=True)
    path = sweep.resolve()
    if path in _held:
        return
    try:
        _held[path] = lock_folder(path, "two launches of this sweep are not kept apart")
    except BlockingIOError:
        raise ConfigError(f"hydra.sweep.dir={str(sweep)!r} is being launched by another process; wait for it to "
                          f"end (two launches of one sweep would train the same folders)") from None


def release(sweep: Path) -> None:
    fd = _held.pop(Path(sweep).resolve(), None)
    if fd is not None:
        os.close(fd)


def _runs_below(sweep: Path) -> dict[Path, dict | None]:
    """Every run folder directly below the sweep folder -> its recorded identity (None: damaged or absent)."""
    runs: dict[Path, dict | None] = {}
    if not sweep.is_dir():
        return runs
    for entry in sorted(os.scandir(sweep), key=lambda e: e.name):
        folder = RunFolder(entry.path)
        if entry.is_dir(follow_symlinks=False) and folder.is_run():
            try:
                runs[folder.path] = folder.read_identity() or folder.saved_identity()
            except Exception:
                runs[folder.path] = None
    return runs


def _differences(identity: dict, job: DictConfig, extend: bool = True) -> list[str]:
    """The job's settings against a recorded run's, in the record's form (format 2 resolved, older as written)."""
    return differences(identity["settings"], settings(job, resolve=identity.get("format", 1) == rr.IDENTITY_FORMAT),
                       extend)


def _same_run(identity: dict | None, job: DictConfig, extend: bool) -> bool:
    return identity is not None and not _differences(identity, job, extend)


def plan(config: DictConfig, jobs: list[tuple[int, DictConfig]]) -> dict[int, Path]:
    """MULTIRUN, before the first job: the folder of each job, under the sweep's lock; one line before anything
    is written if two jobs would share a folder, if a job's folder holds another run or a link, or if a run it
    continues was trained on other data or its record disagrees with its checkpoint."""
    sweep = Path(str(config.hydra.sweep.dir))
    if RunFolder(sweep).is_run():
        raise ConfigError(f"hydra.sweep.dir={str(sweep)!r} holds a run (its record); a sweep gets a folder of its "
                          f"own: choose another hydra.sweep.dir")
    for name in SWEEP_FILES:
        path = sweep / name
        if path.is_symlink():
            raise RunFolderError(f"{path} is a symbolic link (to {os.readlink(path)}); a sweep writes only inside "
                                 f"its own folder: remove the link")
        if path.exists() and not path.is_file():
            raise RunFolderError(f"{path} is not a plain file; a sweep writes it: move it away")
    default = {num: job_dir(job, num) for num, job in jobs}
    seen: dict[Path, int] = {}
    for num, folder in default.items():
        if folder.is_symlink():
            raise RunFolderError(f"{folder} is a symbolic link (to {os.readlink(folder)}); a sweep writes only inside "
                                 f"its own folder: replace the link by the folder it points to")
        if folder.parent.resolve() != sweep.resolve():
            raise ConfigError(f"job {num}'s folder {str(folder)!r} is not directly inside hydra.sweep.dir; "
                              f"hydra.sweep.subdir names one folder")
        if folder in seen:
            raise ConfigError(f"jobs {seen[folder]} and {num} would share the folder {str(folder)!r}; name what "
                              f"differs between them in hydra.sweep.subdir (it holds one run)")
        seen[folder] = num
    _hold(sweep)
    runs = _runs_below(sweep)
    byjob = dict(jobs)
    target: dict[int, Path] = {}
    for num, job in jobs:  # a job's own folder first, then a run of the same identity no job of this launch owns
        own = default[num]
        job_dir(job, num)
        match = own if _same_run(runs.get(own), job, True) else next(
            (f for f in runs if f not in seen and f not in target.values() and _same_run(runs[f], job, False)), None)
        if match is not None:
            target[num] = match
    for num, job in jobs:
        if num in target:
            continue
        own = default[num]
        if RunFolder(own).is_run() or own in target.values():
            job_dir(job, num)
            recorded = runs.get(own)
            shown = "; ".join(_differences(recorded, job)[:3]) if recorded else \
                "its record is damaged or absent"
            raise ConfigError(f"job {num}'s folder {str(own)!r} holds another run ({shown}); relaunch the sweep with "
                              f"its own settings, or choose another hydra.sweep.dir")
        target[num] = own
    fingerprints: dict[str, str] = {}  # one load per distinct data setting, not per job
    for num, path in target.items():
        folder = RunFolder(path)
        if not folder.is_run():
            continue
        folder.check_links()
        job = byjob[num]
        job_dir(job, num)
        errors = continuation_errors(folder, job)
        if errors:
            raise ConfigError(f"job {num}'s folder {str(path)!r} holds a run this job may not continue ("
                              f"{'; '.join(errors[:2])})")
        recorded = runs.get(path)
        if isinstance(recorded, dict) and isinstance(recorded.get("data"), str):
            key = json.dumps(OmegaConf.to_container(job.data, resolve=True), sort_keys=True, default=str)
            if key not in fingerprints:
                fingerprints[key] = data_fingerprint(job)
            check_data(folder, recorded, fingerprints[key])
    for num in target:
        refusal_note(sweep, num).unlink(missing_ok=True)  # this launch's own verdict replaces an earlier one
    if any(target[num] != default[num] for num in target):
        names = {str(num): folder.name for num, folder in target.items()}
        write_atomic(sweep / JOBS, (json.dumps({"folders": names}, indent=1) + "\n").encode())
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra.append("hydra.sweep.subdir='${allconv.job_folder:${hydra.sweep.dir},"
                                                "${hydra.job.num}}'")  # quoted: the override grammar nests no ${}
        moved = [f"job {n} -> {target[n].name}" for n in target if target[n] != default[n]]
        print(f"relaunch: {len(moved)} job(s) continue their run under another number ({', '.join(moved[:4])}"
              f"{', ...' if len(moved) > 4 else ''})", file=sys.stderr, flush=True)
    return target


def job_folder(sweep_dir: str, num) -> str:
    """The resolver behind ${allconv.job_folder:...}: the folder name plan() chose for job `num`."""
    path = Path(str(sweep_dir)) / JOBS
    names = rr.read_json(path)
    name = names.get("folders", {}).get(str(num)) if isinstance(names, dict) else None
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise RunFolderError(f"{path} names no folder for job {num}; relaunch the sweep")
    return name


def register_resolver() -> None:
    if not OmegaConf.has_resolver("allconv.job_folder"):
        OmegaConf.register_new_resolver("allconv.job_folder", job_folder, use_cache=False)


def check_job_folder(folder: RunFolder, sweep: Path) -> None:
    """At a job's start: its folder is a real folder directly inside the sweep folder."""
    folder.check_links()
    if folder.path.parent.resolve() != Path(sweep).resolve():
        raise RunFolderError(f"{folder.path} is not inside the sweep folder {sweep}; a job trains only there")


def failed_jobs(sweep: Path, target: dict[int, Path]) -> list[str]:
    """The jobs of a sweep that failed, diverged or were refused, each as 'job N (<folder>): <error>'."""
    out = []
    for num, path in sorted(target.items()):
        note = refusal_note(sweep, num)
        try:
            refused = rr.read_bytes(note)
        except RunFolderError:
            refused = None
        if refused is not None:
            out.append(f"job {num} ({path.name}): refused: {refused.decode(errors='replace').strip()[:200]}")
            continue
        try:
            outcome = RunFolder(path).outcome()
        except RunFolderError:
            outcome = None
        if rr.status_of(outcome) in (rr.FAILED, rr.DIVERGED):
            out.append(f"job {num} ({path.name}): {str(outcome.get('error', ''))[:200]}")
    return out


class JobPlan(NamedTuple):
    action: str  # train | resume | skip
    ckpt_path: str | None = None
    metrics: dict | None = None
    note: str = ""


def plan_job(folder: RunFolder) -> JobPlan:
    """What a multirun job does with its folder: skip a finished or diverged run, continue one with a checkpoint,
    else train."""
    now = folder.state()
    if now in rr.DONE:
        metrics = folder.outcome() or {}
        error = metrics.get("test_error")
        shown = f"test error {error:.4f}" if isinstance(error, float) and math.isfinite(error) else now
        return JobPlan("skip", metrics=metrics, note=f"{folder.path}: already {now} ({shown}); skipped")
    if os.path.isfile(folder.checkpoint) and not os.path.islink(folder.checkpoint):
        from allconv import checkpoint

        saved = checkpoint.read(folder.checkpoint)  # a damaged one is a CheckpointError naming it
        return JobPlan("resume", str(folder.checkpoint),
                       note=f"{folder.path}: continuing from checkpoints/last.ckpt (epoch {saved.get('epoch')}, "
                            f"global step {saved.get('global_step')})")
    return JobPlan("train")
