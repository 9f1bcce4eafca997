"""hydra/launcher=local_parallel: a multirun's jobs several at a time on one machine, one GPU each.

Built on hydra-joblib-launcher (joblib's loky pool of worker processes, which Hydra's own plugin
drives: composition, job folders, pickling). conf/hydra/launcher/local_parallel.yaml adds the
LocalParallel callback, which does two things joblib does not:

- in the launching process it registers the resolver that the launcher's n_jobs reads: as many
  jobs at once as there are visible GPUs, or 2 without a GPU (plan());
- in each worker process, before its first job touches CUDA, it claims one slot (a lock file in
  the sweep folder, held for the worker's lifetime) and pins the process to that slot's GPU with
  CUDA_VISIBLE_DEVICES (device_for_slot()); the worker's later jobs keep that GPU. torch's CPU
  threads are split between the jobs, so parallel jobs do not oversubscribe the cores.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

RESOLVER = "allconv_parallel_jobs"
CPU_JOBS = 2  # without a GPU: two jobs share the cores
_slot: tuple[int, int] | None = None  # (slot, lock fd) claimed by this worker process


@dataclass(frozen=True)
class Plan:
    n_jobs: int
    threads_per_job: int


def plan(n_gpus: int, n_cpus: int, n_jobs: int | None = None) -> Plan:
    """How many jobs at once (n_jobs, if not given: one per GPU, or CPU_JOBS without GPU) and torch threads each."""
    if n_jobs is None or n_jobs < 1:
        n_jobs = n_gpus if n_gpus > 0 else CPU_JOBS
    return Plan(n_jobs, max(1, n_cpus // n_jobs))


def visible_devices(env: dict | None = None, n_gpus: int | None = None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES items (indices or UUIDs)."""
    env = os.environ if env is None else env
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    return [str(k) for k in range(_gpu_count() if n_gpus is None else n_gpus)]


def device_for_slot(slot: int, devices: list[str]) -> str | None:
    """The GPU of worker slot k: the k-th visible one (round robin when there are more jobs than GPUs)."""
    return devices[slot % len(devices)] if devices else None


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _n_jobs() -> int:
    return plan(_gpu_count(), _cpu_count()).n_jobs


OmegaConf.register_new_resolver(RESOLVER, _n_jobs, replace=True)  # needed wherever the launcher config resolves


def claim_slot(folder: Path, n_slots: int, timeout_s: float = 600.0) -> int:
    """The lowest free slot in 0..n_slots-1, locked (flock) until this process exits; the same one if held."""
    global _slot
    if _slot is not None:
        return _slot[0]
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        for k in range(n_slots):
            fd = os.open(folder / f"slot-{k}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _slot = (k, fd)  # the fd stays open: the lock lives as long as the worker
            return k
        if time.monotonic() > deadline:  # a slot frees only when a worker exits and loky replaces it
            raise RuntimeError(f"local_parallel: no free slot of {n_slots} in {folder} after {timeout_s:.0f} s")
        time.sleep(0.5)


class LocalParallel(Callback):
    """Pins each job of hydra/launcher=local_parallel to its worker's GPU and splits the CPU threads."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        import torch
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:  # a single run (no -m) keeps this process's devices
            return
        n_jobs = int(config.hydra.launcher.n_jobs)
        devices = visible_devices()
        slot = claim_slot(Path(config.hydra.sweep.dir) / ".local_parallel", n_jobs)
        device = device_for_slot(slot, devices)
        if device is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = device  # before this process first initialises CUDA
        threads = plan(len(devices), _cpu_count(), n_jobs).threads_per_job
        torch.set_num_threads(threads)
        print(f"local_parallel: job {config.hydra.job.num} in slot {slot} of {n_jobs}: "
              f"CUDA_VISIBLE_DEVICES={device if device is not None else '(none)'}, {threads} torch threads",
              file=sys.stderr, flush=True)
