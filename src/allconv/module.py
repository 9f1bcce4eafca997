"""The paper's training recipe as a LightningModule.

Cross-entropy, SGD with momentum 0.9 and weight decay 1e-3, learning rate x0.1 at fixed epochs
(200, 250, 300 of 350 in the paper). Not in the paper: the update cap, lr_t * |g| <= max_update_norm
at every step, from the learning rate in force at that step (README, "Why it trains"). Metrics
accumulate on the device and are logged per epoch: the training step makes no host sync. A
non-finite loss is recorded on the device (the first step where it happened) and checked once per
epoch by callbacks.FiniteLossGuard.
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn


class AllConvModule(L.LightningModule):
    def __init__(self, net: nn.Module, num_classes: int, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 1e-3, milestones=(200, 250, 300), gamma: float = 0.1,
                 nesterov: bool = False, max_update_norm: float | None = 0.125, compile: bool = False,
                 channels_last: bool = False, hparams: dict | None = None):
        super().__init__()
        self.save_hyperparameters(hparams or {})
        self.net = net
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.milestones, self.gamma, self.nesterov = list(milestones), gamma, nesterov
        self.max_update_norm = max_update_norm
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # Compile the network, not the LightningModule: hooks and logging stay eager. Kept out of
        # the module registry so checkpoints hold the weights once, under net.*.
        object.__setattr__(self, "forward_net", torch.compile(self.net) if compile else self.net)
        # validate_args=False: the argument checks call torch.unique, a host sync on every step.
        metric = dict(task="multiclass", num_classes=num_classes, validate_args=False)
        self.train_acc = torchmetrics.Accuracy(**metric)
        self.val_acc = torchmetrics.Accuracy(**metric)
        self.test_acc = torchmetrics.Accuracy(**metric)
        self.register_buffer("first_bad_step", torch.tensor(-1, dtype=torch.long), persistent=False)
        # The step counter lives on the device too: torch.tensor(batch_idx, device="cuda") would be a
        # host-to-device copy from pageable memory, which synchronises the stream every step.
        self.register_buffer("step_in_epoch", torch.tensor(0, dtype=torch.long), persistent=False)
        self._epoch_start = None
        self._loss_sum, self._seen = torch.zeros(()), 0
        self._grad_norm_sum, self._clipped, self._steps = torch.zeros(()), torch.zeros(()), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.forward_net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        # Remember the first non-finite step without a host sync (checked once per epoch).
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step.copy_(torch.where(bad & (self.first_bad_step < 0), self.step_in_epoch, self.first_bad_step))
        self.step_in_epoch += 1
        # Sums on the device, logged once per epoch: self.log per step costs ~1 ms of Python.
        self.train_acc.update(logits.detach(), y)
        self._loss_sum += loss.detach() * len(y)
        self._seen += len(y)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """The update cap: clip the global gradient norm to max_update_norm / lr_t, lr_t the rate of this step.

        Lightning calls this hook before every optimizer step (after unscaling under fp16), with the
        Trainer's own clip settings, which are applied as well when a user sets them.
        """
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        lr = optimizer.param_groups[0]["lr"]
        max_norm = self.max_update_norm / lr if self.max_update_norm is not None else float("inf")
        # clip_grad_norm_ scales by min(1, max_norm / norm) on the device: no host sync.
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm, foreach=True)
        self._grad_norm_sum += norm.detach()
        self._clipped += (norm.detach() > max_norm).float()
        self._steps += 1

    def on_train_epoch_start(self):
        self._epoch_start = time.perf_counter()
        self._loss_sum, self._seen = torch.zeros((), device=self.device), 0
        self._grad_norm_sum, self._clipped, self._steps = torch.zeros((), device=self.device), \
            torch.zeros((), device=self.device), 0
        self.step_in_epoch.zero_()
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("lr", lr, on_step=False, on_epoch=True)
        if self.max_update_norm is not None:  # the lr changes only between epochs: one threshold per epoch
            self.log("optim/clip_norm", self.max_update_norm / lr, on_step=False, on_epoch=True)

    def on_train_epoch_end(self):
        if self._seen:
            self.log("train/loss", self._loss_sum / self._seen, prog_bar=True, sync_dist=True)
            self.log("train/acc", self.train_acc.compute())
        if self._steps:
            self.log("train/grad_norm", self._grad_norm_sum / self._steps)
            if self.max_update_norm is not None:
                self.log("optim/clipped_frac", self._clipped / self._steps)
        self.train_acc.reset()
        if self._epoch_start is not None:
            self.log("epoch_time_s", time.perf_counter() - self._epoch_start, on_step=False, on_epoch=True)

    def _eval_step(self, batch, metric, prefix):
        x, y = batch
        logits = self(x)
        metric(logits, y)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, y), on_step=False, on_epoch=True, sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_acc, "val")

    def on_validation_epoch_end(self):
        self.log("val/error", 1.0 - self.val_acc.compute(), prog_bar=True)
        self.val_acc.reset()

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_acc, "test")

    def on_test_epoch_end(self):
        self.log("test/error", 1.0 - self.test_acc.compute())
        self.test_acc.reset()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.net.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay, nesterov=self.nesterov)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.milestones, gamma=self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
