"""A run folder holds one run: a new run never overwrites one, a relaunched sweep job continues its own.

What a folder holds is read from two files only: checkpoints/last.ckpt (through allconv.checkpoint,
weights_only) and metrics.json (JSON; only its "status" and "test_error" are used):

    new          absent or empty
    finished     metrics.json says "ok"
    interrupted  a last.ckpt and no finished metrics.json: it can continue from the checkpoint
    started      files but no checkpoint (stopped or failed before its first epoch ended)

A single run (`python src/train.py`) may only start in a new folder, or continue its own with
`resume=<dir>`; the pre-flight refuses anything else before Hydra writes a byte. A multirun job
(the basic and joblib launchers, submitit on SLURM) is a fixed point of its sweep: relaunching the
same sweep into its folder (`hydra.sweep.dir=<dir>`) skips the jobs that finished, continues the
interrupted ones from their last.ckpt and runs the rest. That is also how a requeued SLURM job
finds its work. The pre-flight checks that each job's folder, if it holds a run, holds this job
(the same composed config), so a changed sweep, or changed defaults, cannot continue another
job's checkpoint.

hold() takes an exclusive lock on the folder (flock on the directory itself: no lock file is
written into the run) for as long as the process trains it, so two resumes of one run cannot both
train. DDP ranks other than 0 share rank 0's folder and take no lock.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig, OmegaConf, open_dict

from allconv.errors import ConfigError, ResumeError

CHECKPOINT = Path("checkpoints") / "last.ckpt"
_held: dict[Path, int] = {}  # folders this process holds the lock of -> their descriptor


def is_secondary_rank() -> bool:
    """A DDP rank other than 0 of a job (Lightning's children, torchrun, or a SLURM task > 0)."""
    return any(int(os.environ.get(k) or 0) > 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def finished_metrics(run_dir: Path) -> dict | None:
    """metrics.json of a finished run, or None (absent, unreadable, not JSON, not "ok")."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("status") == "ok" else None


def state(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "new"
    if finished_metrics(run_dir) is not None:
        return "finished"
    return "interrupted" if (run_dir / CHECKPOINT).is_file() else "started"


def hold(run_dir: Path) -> None:
    """Lock run_dir for this process; ResumeError if another process holds it (it is training this run)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held or is_secondary_rank():
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ResumeError(f"{run_dir} is being trained by another process; wait for it to end "
                          f"(two processes cannot train one run)") from None
    _held[run_dir] = fd


def release(run_dir: Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the lock


def _same_file(a, b: Path) -> bool:
    try:
        return Path(str(a)).expanduser().resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def check_single_run(cfg: DictConfig) -> None:
    """RUN mode, before Hydra creates hydra.run.dir: it is new, or it is the run resume= continues (then held)."""
    if is_secondary_rank():
        return
    run_dir = Path(str(OmegaConf.select(cfg, "hydra.run.dir")))
    now = state(run_dir)
    if now == "new":
        return
    resuming = bool(cfg.get("ckpt_path")) and _same_file(cfg.ckpt_path, run_dir / CHECKPOINT)
    if resuming and now == "interrupted":
        hold(run_dir)
        return
    what = {"finished": "a finished run (metrics.json)", "interrupted": "an interrupted run (checkpoints/last.ckpt)",
            "started": "files of another run"}[now]
    advice = f"continue it with: python src/train.py resume={run_dir}" if now == "interrupted" else \
        "choose another hydra.run.dir (or leave it unset)"
    raise ConfigError(f"hydra.run.dir={str(run_dir)!r} already holds {what}; a run is never overwritten: {advice}")


def sweep_job_dir(job: DictConfig, num: int) -> Path:
    """The folder the launcher will give job number `num` of a sweep (hydra.sweep.dir / hydra.sweep.subdir)."""
    from hydra.core.hydra_config import HydraConfig

    with open_dict(job):
        job.hydra.job.num = num
        job.hydra.job.id = str(num)
    HydraConfig.instance().set_config(job)  # ${hydra:...} in the subdir resolves as it will in the job
    return Path(str(job.hydra.sweep.dir)) / str(job.hydra.sweep.subdir)


def _flat(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


def check_sweep_job(job: DictConfig, num: int) -> None:
    """MULTIRUN, before the first job starts: a job's folder that holds a run holds this same job.

    The same job is the same composed config (.hydra/config.yaml, unresolved), not only the same
    overrides: a default changed since the folder was made also makes it another run.
    """
    run_dir = sweep_job_dir(job, num)
    if state(run_dir) == "new":
        return
    mine = _flat(OmegaConf.to_container(job, resolve=False))
    mine = {k: v for k, v in mine.items() if not k.startswith("hydra.")}
    try:
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=False)
    except Exception:  # absent, not YAML: the folder is not this job's
        saved = None
    saved = _flat(saved) if isinstance(saved, dict) else {}
    differ = sorted(k for k in mine.keys() | saved.keys() if mine.get(k, "<unset>") != saved.get(k, "<unset>"))
    if differ:
        shown = ", ".join(f"{k} {saved.get(k, '<unset>')} vs {mine.get(k, '<unset>')}" for k in differ[:3]) \
            if saved else "no .hydra/config.yaml"
        raise ConfigError(f"job {num}'s folder {str(run_dir)!r} holds another run (its config: {shown}); relaunch "
                          f"the sweep with its own settings, or choose another hydra.sweep.dir")


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
