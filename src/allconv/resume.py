"""Resume a killed run from its last checkpoint: python src/train.py resume=<run dir> [key=value ...].

expand_argv() turns resume=<dir> into the run's own command line: the overrides Hydra saved in
<dir>/.hydra/overrides.yaml (any later key=value on the command line replaces the saved one),
ckpt_path=<dir>/checkpoints/last.ckpt and hydra.run.dir=<dir>, in run mode. The run continues in
the same folder and writes the metrics.json it would have written.

Lightning's checkpoint restores weights, optimiser, schedule and loop counters but not the random
state, so EpochSeed reseeds the global RNG (dropout) at the start of every epoch from (seed,
epoch, rank): a resumed run then draws what the uninterrupted run would have drawn, and ends with
the same weights. The data order is already a function of (seed, epoch) (data.DeviceLoader).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from allconv.errors import ResumeError


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


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
        checkpoint.read(ckpt)
    except CheckpointError as e:
        raise ResumeError(f"resume={run}: {e}; delete it and start the run again "
                          f"(or restore an earlier copy of last.ckpt)") from None
    from allconv.run_folder import finished_metrics

    if finished_metrics(run) is not None:
        raise ResumeError(f"resume={run}: the run already finished (metrics.json); nothing to resume")
    from omegaconf import OmegaConf

    extra = [a for a in argv[1:] if not a.startswith("resume=")]
    replaced = {_key(a) for a in extra} | {"ckpt_path", "hydra.run.dir", "hydra.mode"}
    kept = [o for o in OmegaConf.load(saved) if _key(o) not in replaced]
    return [argv[0], *kept, *extra, f"ckpt_path={_quote(str(ckpt))}", f"hydra.run.dir={_quote(str(run))}",
            "hydra.mode=RUN"]


class EpochSeed(L.Callback):
    """Reseed the global RNG at each epoch start from (seed, epoch, rank), so a resumed epoch repeats exactly."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer, pl_module):
        torch.manual_seed((self.seed * 1_000_003 + trainer.current_epoch * 1_009 + trainer.global_rank) % 2**63)
