"""Callbacks of a run: checkpoints written atomically, progress bars, the guided-backprop grid.

build_callbacks(cfg, run_dir) is the default list. The non-finite-loss guard is the module's own
(module.AllConvModule._check_finite), which Lightning runs before ModelCheckpoint saves.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from allconv.errors import NonFiniteLossError  # noqa: F401  (raised by the module; kept importable)
from allconv.preprocessing import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file and rename, so a kill during a save leaves the previous checkpoint usable."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, path)


class LastCheckpoint(ModelCheckpoint):
    """last.ckpt every n epochs, nothing else.

    Lightning 2.6's ModelCheckpoint(save_top_k=0, save_last=True) writes last.ckpt only in a step
    where it also wrote a top-k file, i.e. only at the end of fit: a killed run had nothing to resume.
    """

    def on_train_epoch_end(self, trainer, pl_module):
        if self._should_skip_saving_checkpoint(trainer):
            return
        if self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module):
        pass  # saved at the end of the training epoch, after the guard has checked the loss


def build_callbacks(cfg, run_dir: Path) -> list[L.Callback]:
    cbs: list[L.Callback] = []
    c = cfg.callbacks
    if c.checkpoint.every_n_epochs:
        cbs.append(LastCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                                  every_n_epochs=c.checkpoint.every_n_epochs, save_on_train_epoch_end=True))
    refresh = c.get("progress_bar_refresh", 1)  # each refresh costs ~1 ms of Python: a GPU step is ~1 ms
    if c.progress_bar == "rich":
        cbs.append(RichProgressBar(refresh_rate=refresh, leave=True))
    elif c.progress_bar == "tqdm":
        cbs.append(TQDMProgressBar(refresh_rate=refresh))
    if c.get("guided_backprop") and c.guided_backprop.get("every_n_epochs"):
        from allconv.visualize_callback import GuidedBackpropGrid

        cbs.append(GuidedBackpropGrid(run_dir=run_dir, **c.guided_backprop))
    return cbs

