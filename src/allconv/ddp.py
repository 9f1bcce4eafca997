"""DDP for trainer=ddp: ranks that relaunch the right Hydra job, and a check that the ranks agree.

Lightning starts ranks 1..N-1 by re-running the script with the parent's argv plus
hydra.run.dir. In a Hydra multirun that argv holds -m and every sweep value, so each child would
start the whole sweep again, in the wrong folder. lightning_private.HydraJobDDPStrategy relaunches the one job
instead: its own overrides, its own output folder, in run mode. Under SLURM or torchrun the ranks
are started by the cluster and none of this is used.

rank_summary() all-gathers, after fit, each rank's weight checksum and whether it fitted the ZCA
or loaded it from the cache; training.train records it in metrics.json, so a run shows that its
ranks ended with identical weights and that the whitening was fitted once.
"""

from __future__ import annotations

import hashlib
import sys

import torch


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def hydra_job_command(local_rank: int) -> tuple[list[str], str]:
    """argv and cwd that re-run this Hydra job (not the sweep) as rank local_rank."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hc = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hc.overrides.task)
    command += [f"hydra.run.dir={_quote(hc.runtime.output_dir)}", f"hydra.job.name=ddp_rank_{local_rank}",
                "hydra.output_subdir=null", "hydra.mode=RUN"]
    return command, get_original_cwd()


def weights_checksum(module: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def rank_summary(trainer, module: torch.nn.Module, datamodule) -> dict:
    """Per-rank weight checksums and ZCA provenance, gathered on every rank (call on all ranks)."""
    import torch.distributed as dist

    mine = {"rank": trainer.global_rank, "weights": weights_checksum(module),
            "zca_loaded_from_cache": getattr(datamodule, "zca_from_cache", None)}
    ranks = [None] * trainer.world_size
    dist.all_gather_object(ranks, mine)
    return {"world_size": trainer.world_size, "ranks": ranks,
            "weights_identical": len({r["weights"] for r in ranks}) == 1,
            "zca_fits": sum(r["zca_loaded_from_cache"] is False for r in ranks)}


_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_env_before: dict[str, str | None] | None = None


def remember_launch_env() -> None:
    """Called as the ranks are launched: the environment to restore when the job ends (end_job)."""
    global _env_before
    import os

    _env_before = {k: os.environ.get(k) for k in _LAUNCH_ENV}


def end_job() -> None:
    """Close this job's process group and undo the launcher's environment, so the next multirun job in
    this process launches its own ranks (Lightning would otherwise think they were started externally)."""
    global _env_before
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _env_before is not None:
        for k, v in _env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _env_before = None
