"""Callbacks of a run: checkpoints written atomically, preemption, the cost estimate, progress bars, the grid.

build_callbacks(cfg, run_dir) is the default list. The non-finite-loss guard is the module's own
(module.AllConvModule._check_finite), which Lightning runs before ModelCheckpoint saves. Every
checkpoint goes through AtomicCheckpointIO: a disk that refuses it (full, read-only) ends the run
with a WriteError naming the file, and the previous checkpoint stays whole.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from allconv.errors import Interrupted, NonFiniteLossError  # noqa: F401  (raised by the module; kept importable)
from allconv.lightning_private import LastCheckpoint
from allconv.preprocessing import atomic_torch_save
from allconv.run_folder import RunFolder


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file and rename, so a kill during a save leaves the previous checkpoint usable."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_torch_save(checkpoint, Path(path))  # creates the folder; WriteError if the disk refuses


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size if unit == "days" else seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


# SIGTERM: a scheduler's stop (SLURM's preemption, `scontrol requeue`, the time limit); SIGINT: Ctrl+C; SIGUSR2:
# submitit's time-limit/preemption signal (hydra_plugins.allconv_launchers' SlurmLauncher then lets submitit
# requeue the job); SIGUSR1: Lightning's SLURM requeue signal, whose own handler saves from inside a step
# (see cluster_plugins).
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def resume_command(run_dir: Path) -> str:
    """The command that continues run_dir. Under submitit sys.argv[0] is submitit's _submit.py, not the script."""
    script = sys.argv[0] if sys.argv and Path(sys.argv[0]).name == "train.py" else "src/train.py"
    return f"python {shlex.quote(script)} resume={shlex.quote(str(run_dir))}"


class Preemption(L.Callback):
    """SIGTERM, SIGINT, SIGUSR1 or SIGUSR2: stop at the next step boundary, save last.ckpt, end with Interrupted.

    Lightning 2.6 (its SignalConnector) turns SIGTERM into trainer.received_sigterm and raises
    SIGTERMException at the next boundary: after a training step (optimizer step and
    on_train_batch_end done), after a validation or test batch, or at the end of the epoch; under
    DDP rank 0's flag is broadcast so that every rank stops at the same step. By itself it then
    exits 0, with no checkpoint and no word. This callback builds on that: SIGINT is routed to the
    same handler (instead of a KeyboardInterrupt in the middle of a step), on_exception saves
    last.ckpt, and interrupted_as_error() turns the SIGTERMException into Interrupted, whose
    message is the command that resumes the run. A second signal ends the process at once.

    The USR signals take the same route, so every preemption signal of SLURM and submitit stops at a step
    boundary with one checkpoint. Lightning's own SLURM auto-requeue (SIGUSR1: save hpc_ckpt_<n>.ckpt from
    inside the signal handler, one step short of where the run stops, then `scontrol requeue`) is switched
    off by the trainer's cluster environment (cluster_plugins).

    Under DDP the ranks decide together. Lightning only shares rank 0's flag at the start of a step; its
    checks after a step and at an epoch's end read each rank's own flag, so a rank signalled there (or one
    whose handler waits while it is blocked in a collective) would stop alone and leave the others in the
    next step's collective: a hang until the scheduler kills the job, with no checkpoint. So on several
    ranks the handler only records the signal, and at every batch end the ranks reduce it (the largest
    signal number, 0 for none); when any rank was signalled, every rank raises Lightning's flag there and
    all stop after that same step. The cost is one scalar all-reduce per step, beside Lightning's own
    per-step broadcast of the flag. Only training steps are agreed on (every rank takes the same number;
    validation and test shards may differ by a batch), so on several ranks a signal during validation
    stops the run after the next training step, and one during the test lets the test finish.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.ckpt = RunFolder(run_dir).checkpoint
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._lightning_handler = None
        self._ranks = 1
        self._agreed: int | None = None  # the signal the ranks agreed to stop on (several ranks)
        self._rng: list | None = None
        self._steps = 0

    # -- the signals -----------------------------------------------------------------------
    def _install(self, trainer) -> None:
        lightning_handler = signal.getsignal(signal.SIGTERM)  # Lightning's, registered before any *_start hook
        main = threading.current_thread() is threading.main_thread()
        if self._previous or not callable(lightning_handler) or not main:
            return
        self._lightning_handler, self._ranks = lightning_handler, trainer.world_size

        def handler(signum, frame):
            if self.signum is not None:  # asked twice: stop now, as the signal's default does
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self.signum = signum
            print(f"{signal.Signals(signum).name}: stopping at the end of this step to save a checkpoint "
                  f"(send it again to stop at once)", file=sys.stderr, flush=True)
            if self._ranks == 1:  # on several ranks, _agree() raises Lightning's flag on all of them at once
                lightning_handler(signal.SIGTERM, frame)

        for signum in PREEMPTION_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, handler)

    def _agree(self, trainer) -> None:
        """Several ranks: the largest signal any rank received, on every rank; if any, Lightning's flag on all."""
        if self._ranks == 1 or self._lightning_handler is None or trainer.received_sigterm:
            return
        import torch
        import torch.distributed as dist

        signum = torch.tensor([self.signum or 0], device=trainer.strategy.root_device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        if signum.item():
            # Not self.signum: Lightning's handler forwards SIGTERM to the ranks it launched, and that signal,
            # arriving next, must not count as a second one (which stops at once).
            self._agreed = int(signum.item())
            self._lightning_handler(signal.SIGTERM, None)

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
        self._previous = {}

    # -- the random state of a checkpoint written mid-epoch ------------------------------------
    def state_dict(self) -> dict:
        """Every rank's RNG states, so a run resumed mid-epoch draws the dropout masks it would have drawn.

        At epoch starts EpochSeed reseeds; within an epoch only this saved state can. Called on
        every rank while a checkpoint is made (rank 0 writes it), so under DDP the states are gathered.
        """
        import torch
        import torch.distributed as dist

        states = {"cpu": torch.get_rng_state(),
                  "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            return {"rng": gathered}
        return {"rng": [states]}

    def load_state_dict(self, state_dict: dict) -> None:
        self._rng = state_dict.get("rng")

    def on_train_start(self, trainer, pl_module):
        import torch

        self._install(trainer)
        rng, self._rng = self._rng, None
        if rng:  # mid-epoch, no on_train_epoch_start (no EpochSeed) follows; else the next epoch reseeds anyway
            mine = rng[trainer.global_rank] if trainer.global_rank < len(rng) else rng[0]
            torch.set_rng_state(mine["cpu"])
            if mine["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(mine["cuda"])

    def on_train_epoch_start(self, trainer, pl_module):
        self._steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._steps = batch_idx + 1  # steps done in this epoch, for the message
        self._agree(trainer)  # before Lightning's own check after this step

    def on_test_start(self, trainer, pl_module):
        self._install(trainer)

    def on_train_end(self, trainer, pl_module):
        self._restore()

    def on_test_end(self, trainer, pl_module):
        self._restore()

    # -- the checkpoint and the message ----------------------------------------------------
    def on_exception(self, trainer, pl_module, exception):
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        signum = self._agreed or self.signum or signal.SIGTERM
        name = signal.Signals(signum).name
        command = resume_command(self.run_dir)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and not trainer.validating and not trainer.sanity_checking:
            steps = trainer.num_training_batches
            # Lightning stops after a step, or after the epoch's end hooks (then current_epoch is the next one).
            where = f"epoch {trainer.current_epoch}, step {self._steps} of {steps}" if self._steps < steps else \
                f"the end of epoch {trainer.current_epoch - 1}"
            trainer.save_checkpoint(self.ckpt)
            message = f"{name} at {where}: saved {self.ckpt}; continue with: {command}"
        elif fitting:  # inside validation: the last checkpoint is from the end of an earlier epoch
            where = f"{name} during validation of epoch {trainer.current_epoch}"
            message = f"{where}; continue from the last checkpoint with: {command}" if self.ckpt.is_file() else \
                f"{where}, before the first checkpoint; start the run again"
        else:
            message = f"{name} during the test; training had finished ({self.ckpt}): {command} runs the test"
        exception.interrupted = Interrupted(f"interrupted by {message}", signum)


@contextlib.contextmanager
def interrupted_as_error():
    """Lightning's SIGTERMException (a SystemExit that exits 0) as Interrupted: status, exit 128+signum, a message."""
    try:
        yield
    except SIGTERMException as e:
        raise getattr(e, "interrupted", None) or Interrupted("interrupted by SIGTERM", signal.SIGTERM) from None


class CostEstimate(L.Callback):
    """One line, a few steps into training: epochs x measured time per epoch -> expected wall time.

    Timed with the host clock at step boundaries only (no device sync). The first warmup_steps are
    not timed (allocation, cuDNN autotuning, compilation); the line comes once min_steps more steps
    and min_seconds have passed, or at the end of the first epoch if that is sooner. On the CPU, a
    run expected to take more than cpu_hours says so and names the CPU recipe.
    """

    def __init__(self, warmup_steps: int = 1, min_steps: int = 2, min_seconds: float = 5.0, cpu_hours: float = 3.0):
        self.warmup_steps, self.min_steps, self.min_seconds, self.cpu_hours = \
            warmup_steps, min_steps, min_seconds, cpu_hours
        self.line: str | None = None
        self._start: float | None = None
        self._steps = 0
        self._t0: float | None = None
        self._n0 = 0

    def on_train_start(self, trainer, pl_module):
        self._start, self._steps, self._t0, self.line = time.perf_counter(), 0, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.line is not None:
            return
        now = time.perf_counter()
        self._steps += 1
        if self._steps == self.warmup_steps:
            self._t0, self._n0 = now, self._steps
        elif self._t0 is not None and self._steps - self._n0 >= self.min_steps and now - self._t0 >= self.min_seconds:
            self._report(trainer, (now - self._t0) / (self._steps - self._n0), now)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.line is None and self._steps:
            now = time.perf_counter()
            t0, n0 = (self._t0, self._n0) if self._t0 is not None and self._steps > self._n0 else (self._start, 0)
            self._report(trainer, (now - t0) / (self._steps - n0), now)

    def _report(self, trainer, per_step: float, now: float) -> None:
        steps_per_epoch = trainer.num_training_batches
        left = max(trainer.estimated_stepping_batches - trainer.global_step, 0)
        total = (now - self._start) + left * per_step
        epochs = trainer.max_epochs - trainer.current_epoch
        device = trainer.strategy.root_device.type
        self.line = (f"estimate: {epochs} epoch{'s' * (epochs != 1)} x {_duration(per_step * steps_per_epoch)} "
                     f"per epoch ({steps_per_epoch} steps x {_duration(per_step)}) -> {_duration(total)} "
                     f"of training on {device} in {trainer.precision}")  # the steps timed ran in it
        if device == "cpu" and total > self.cpu_hours * 3600:
            self.line += (f"; more than {self.cpu_hours:g} h on a CPU: experiment=quick_cpu (make train-jpeg) "
                          f"trains All-CNN-C here in minutes")
        if trainer.is_global_zero:
            print(self.line, flush=True)


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


class RunIdentity(L.Callback):
    """Carries the run's identity.json in every checkpoint (callbacks.RunIdentity), so that the record and the
    checkpoint can be held against each other and a lost record rebuilt (allconv.run_folder). Loading does
    nothing: what a checkpoint says is read by run_folder, never taken as settings."""

    def __init__(self, identity: dict | None):
        self.identity = identity  # None on DDP ranks other than 0, which write no checkpoint

    def state_dict(self) -> dict:
        return dict(self.identity or {})

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def cluster_plugins() -> list:
    """The trainer's cluster environment where Lightning would pick SLURM's: SLURMEnvironment(auto_requeue=False).

    With auto_requeue=True, Lightning's default under SLURM, SIGUSR1 saves hpc_ckpt_<n>.ckpt from inside its signal
    handler (mid-step: the resumed run ends one step short of an uninterrupted one) and requeues; Preemption handles
    SIGUSR1 like SIGTERM instead. Elsewhere (torchrun first, as Lightning checks it first) Lightning picks its own.
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect() or not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=False)]


def build_callbacks(cfg, run_dir: Path) -> list[L.Callback]:
    folder = RunFolder(run_dir)
    cbs: list[L.Callback] = [Preemption(folder.path), CostEstimate()]
    c = cfg.callbacks
    if c.checkpoint.every_n_epochs:
        last = LastCheckpoint(dirpath=str(folder.checkpoints), save_last=True, save_top_k=0,
                              every_n_epochs=c.checkpoint.every_n_epochs, save_on_train_epoch_end=True,
                              enable_version_counter=False)  # a copied run: its own last.ckpt, never -v1
        last.CHECKPOINT_NAME_LAST = folder.checkpoint.stem  # Lightning's documented name for the last checkpoint
        cbs.append(last)
    refresh = c.get("progress_bar_refresh", 1)  # each refresh costs ~1 ms of Python: a GPU step is ~1 ms
    if c.progress_bar == "rich":
        cbs.append(RichProgressBar(refresh_rate=refresh, leave=True))
    elif c.progress_bar == "tqdm":
        cbs.append(TQDMProgressBar(refresh_rate=refresh))
    if c.get("early_stopping"):  # off the paper's recipe: conf/callbacks/early_stopping.yaml
        from lightning.pytorch.callbacks import EarlyStopping

        cbs.append(EarlyStopping(mode="min", check_on_train_epoch_end=False, **c.early_stopping))
    if c.get("guided_backprop") and c.guided_backprop.get("every_n_epochs"):
        from allconv.visualize_callback import GuidedBackpropGrid

        cbs.append(GuidedBackpropGrid(run_dir=folder.path, **c.guided_backprop))
    return cbs

