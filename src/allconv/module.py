"""The paper's training recipe as a LightningModule.

Cross-entropy, SGD with momentum 0.9 and weight decay 1e-3, learning rate x0.1 at fixed epochs
(200, 250, 300 of 350 in the paper). Not in the paper: the update cap, lr_t * |g| <= max_update_norm
at every step, from the learning rate in force at that step (README, "Why it trains"). Metrics
accumulate on the device and are logged per epoch: the training step makes no host sync. A
non-finite loss is recorded on the device (the first step where it happened) and checked once per
epoch, before validation and before the epoch's checkpoint is written (Lightning runs the module's
on_train_epoch_end before ModelCheckpoint's): a diverged run stops and its last good checkpoint stays.
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics

from allconv import models
from allconv.errors import NonFiniteLossError


class AllConvModule(L.LightningModule):
    """One of the 12 networks with the paper's recipe.

    Every argument is a plain value, saved as the checkpoint's hyperparameters: net is the keyword
    arguments of models.build (family, variant, width, dropouts, final_relu, init, final_bias) and
    config the whole run config, so AllConvModule.load_from_checkpoint(path) rebuilds the network
    from the path alone and the checkpoint loads with weights_only=True.
    """

    def __init__(self, net: dict, num_classes: int = 10, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 1e-3, milestones=(200, 250, 300), gamma: float = 0.1,
                 nesterov: bool = False, max_update_norm: float | None = 0.125, compile: bool = False,
                 channels_last: bool = True, config: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = models.build(**net, num_classes=num_classes)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.milestones, self.gamma, self.nesterov = list(milestones), gamma, nesterov
        self.max_update_norm = max_update_norm
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:  # in place: hooks and logging stay eager, the state_dict keys stay net.*
            self.net.compile()
        self.example_input_array = torch.zeros(2, 3, 32, 32)  # the model summary's output shapes and FLOPs
        # validate_args=False: the argument checks call torch.unique, a host sync on every step.
        metric = dict(task="multiclass", num_classes=num_classes, validate_args=False)
        self.train_acc = torchmetrics.Accuracy(**metric)
        self.val_acc = torchmetrics.Accuracy(**metric)
        self.test_acc = torchmetrics.Accuracy(**metric)
        self.register_buffer("first_bad_step", torch.tensor(-1, dtype=torch.long), persistent=False)
        # The step counter lives on the device too: torch.tensor(batch_idx, device="cuda") would be a
        # host-to-device copy from pageable memory, which synchronises the stream every step.
        self.register_buffer("step_in_epoch", torch.tensor(0, dtype=torch.long), persistent=False)
        # Each class score's lowest and highest value over the test set: when every ReLU of one layer is dead,
        # nothing of the image reaches the output and every score is one number for all images, even while
        # the class layer's bias still moves (the report's "died").
        self.register_buffer("test_score_range", torch.zeros(2, num_classes), persistent=False)
        self._epoch_start = None
        self._loss_sum, self._seen = torch.zeros(()), 0
        self._grad_norm_sum, self._clipped, self._steps = torch.zeros(()), torch.zeros(()), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

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
        self._log_lr()

    def _log_lr(self) -> None:
        # The same on every rank, so not reduced: a reduction here would be a collective that only rank 0's
        # progress bar triggers (it reads the epoch's metrics before the module's epoch end), a DDP deadlock.
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("lr", lr, on_step=False, on_epoch=True, rank_zero_only=True)
        if self.max_update_norm is not None:  # the lr changes only between epochs: one threshold per epoch
            self.log("optim/clip_norm", self.max_update_norm / lr, on_step=False, on_epoch=True, rank_zero_only=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The epoch's running sums, for a checkpoint written mid-epoch (callbacks.Preemption)."""
        elapsed = time.perf_counter() - self._epoch_start if self._epoch_start is not None else 0.0
        checkpoint["epoch_sums"] = {"loss_sum": self._loss_sum, "seen": self._seen, "steps": self._steps,
                                    "grad_norm_sum": self._grad_norm_sum, "clipped": self._clipped,
                                    "step_in_epoch": self.step_in_epoch.clone(), "elapsed_s": elapsed,
                                    "train_acc": dict(self.train_acc.metric_state)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resumed_sums = checkpoint.get("epoch_sums")

    def on_train_start(self):
        """Resumed mid-epoch, Lightning does not call on_train_epoch_start: the epoch's sums come back here."""
        sums, self._resumed_sums = getattr(self, "_resumed_sums", None), None
        if sums is None or int(sums["step_in_epoch"]) >= self.trainer.num_training_batches:
            return  # an end-of-epoch checkpoint: the next epoch starts afresh
        dev = self.device
        self._epoch_start = time.perf_counter() - sums["elapsed_s"]
        self._loss_sum, self._seen, self._steps = sums["loss_sum"].to(dev), sums["seen"], sums["steps"]
        self._grad_norm_sum, self._clipped = sums["grad_norm_sum"].to(dev), sums["clipped"].to(dev)
        self.step_in_epoch.copy_(sums["step_in_epoch"])
        self.train_acc.reset()
        self.train_acc.merge_state({k: v.to(dev) for k, v in sums["train_acc"].items()})
        self._log_lr()

    def _check_finite(self) -> None:
        step = int(self.first_bad_step.item())  # the one host sync of the guard, once per epoch
        if step < 0:
            return
        trainer = self.trainer
        ckpt = next((cb.last_model_path for cb in trainer.checkpoint_callbacks if cb.last_model_path), None)
        where = f"; last good checkpoint: {ckpt}" if ckpt else "; no checkpoint was written before it"
        raise NonFiniteLossError(f"non-finite loss at epoch {trainer.current_epoch}, step {step} of the epoch "
                                 f"(lr={trainer.optimizers[0].param_groups[0]['lr']:g}){where}")

    def on_validation_start(self):
        if self.trainer.training:  # validation inside fit: do not validate a diverged network
            self._check_finite()

    def on_train_epoch_end(self):
        self._check_finite()
        if self._seen:
            self.log("train/loss", self._loss_sum / self._seen, prog_bar=True, sync_dist=True)
            self.log("train/acc", self.train_acc.compute(), sync_dist=True)
        if self._steps:
            self.log("train/grad_norm", self._grad_norm_sum / self._steps, sync_dist=True)
            if self.max_update_norm is not None:
                self.log("optim/clipped_frac", self._clipped / self._steps, sync_dist=True)
        self.train_acc.reset()
        if self._epoch_start is not None:
            self.log("epoch_time_s", time.perf_counter() - self._epoch_start, on_step=False, on_epoch=True,
                     sync_dist=True)

    def _eval_step(self, batch, metric, prefix):
        x, y = batch
        logits = self(x)
        metric(logits, y)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, y), on_step=False, on_epoch=True, sync_dist=True)
        return logits

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_acc, "val")

    def on_validation_epoch_end(self):
        self.log("val/error", 1.0 - self.val_acc.compute(), prog_bar=True, sync_dist=True)
        self.val_acc.reset()

    def on_test_epoch_start(self):
        self.test_score_range[0].fill_(math.inf)
        self.test_score_range[1].fill_(-math.inf)

    def test_step(self, batch, batch_idx):
        logits = self._eval_step(batch, self.test_acc, "test").detach().float()
        low, high = self.test_score_range
        torch.minimum(low, logits.min(0).values, out=low)
        torch.maximum(high, logits.max(0).values, out=high)

    def on_test_epoch_end(self):
        self.log("test/error", 1.0 - self.test_acc.compute(), sync_dist=True)
        # the largest spread of one class score over the test images; 0: the output ignores the image
        low, high = self.test_score_range
        self.log("test/score_spread", (high - low).max(), sync_dist=True, reduce_fx="max")
        self.test_acc.reset()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.net.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay, nesterov=self.nesterov)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.milestones, gamma=self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
