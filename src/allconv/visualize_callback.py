"""GuidedBackpropGrid: watch what the network's class units see while it trains.

Every N epochs and at the end of training, for a fixed set of test images, a grid of
image | backprop | deconvnet | guided (for the predicted class) is written to
<run dir>/guided_backprop/epoch_NNN.png and sent to the active logger (W&B or TensorBoard).
A handful of images costs a few forward/backward passes: far below 1% of an epoch. At the end of
training the first two conv layers' filters (allconv.figures) go to <run dir>/filters/<layer>.png
and to the logger too.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from allconv import figures, visualize
from allconv.run_folder import RunFolder


class GuidedBackpropGrid(L.Callback):
    def __init__(self, run_dir: str | Path, every_n_epochs: int = 10, num_images: int = 8, layer: str = "logits",
                 unit: int | None = None, filters: bool = True):
        if not (isinstance(every_n_epochs, int) and every_n_epochs >= 1):
            raise ValueError(f"callbacks.guided_backprop.every_n_epochs must be an integer >= 1, "
                             f"got {every_n_epochs!r}")
        if not (isinstance(num_images, int) and num_images >= 1):
            raise ValueError(f"callbacks.guided_backprop.num_images must be an integer >= 1, got {num_images!r}")
        folder = RunFolder(run_dir)
        self.out_dir = folder.guided_backprop
        self.filters_dir = folder.filters if filters else None
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self.layer, self.unit = str(layer), unit  # a number from Hydra is a str here, so the error can list names
        self._last_epoch = 0  # epochs completed
        self._rendered = -1
        self.written: list[Path] = []

    def _images(self, trainer: L.Trainer):
        """The same test images every time: evenly spaced over the test set."""
        dm = trainer.datamodule
        tensors = getattr(dm, "tensors", None) or {}
        if "x_test" not in tensors or getattr(dm, "raw_test", None) is None:
            return None
        n = len(tensors["x_test"])
        idx = torch.linspace(0, n - 1, min(self.num_images, n)).long()
        return tensors["x_test"][idx], dm.raw_test[idx]

    def _render(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self._rendered == self._last_epoch:
            return
        images = self._images(trainer)
        if images is None:
            return
        net = getattr(pl_module, "net", pl_module)  # the eager network, not a torch.compile wrapper
        x, raw = images
        picture = visualize.method_grid(net, x.to(pl_module.device), raw, self.layer, self.unit)
        path = visualize.save_png(picture, self.out_dir / f"epoch_{self._last_epoch:03d}.png")
        self.written.append(path)
        self._rendered = self._last_epoch
        self._log(trainer, picture, path)

    def _log(self, trainer: L.Trainer, picture: torch.Tensor, path: Path, key: str = "guided_backprop",
             caption: str | None = None) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        caption = caption or f"epoch {self._last_epoch}: image | backprop | deconvnet | guided"
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[str(path)], caption=[caption], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(key, picture, global_step=trainer.global_step)

    def _filters(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.filters_dir is None or not trainer.is_global_zero:
            return
        net = getattr(pl_module, "net", pl_module)
        for name, picture in figures.filter_pictures(net).items():
            path = visualize.save_png(picture, self.filters_dir / f"{name}.png")
            self.written.append(path)
            self._log(trainer, picture, path, key=f"filters/{name}",
                      caption=f"{name} after epoch {self._last_epoch}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_epoch = trainer.current_epoch + 1
        if self._last_epoch % self.every_n_epochs == 0:
            self._render(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_fit_end, not on_train_end: a run continued from a checkpoint of its last epoch (its first end failed on
        # a full disk) trains nothing, and Lightning then calls no training hook; its pictures are still drawn
        self._last_epoch = trainer.current_epoch
        self._render(trainer, pl_module)  # the final network, unless its epoch was just drawn
        self._filters(trainer, pl_module)
