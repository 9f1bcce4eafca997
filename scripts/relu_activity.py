"""Which ReLUs die, and when, in a real run: the project's training path with a probe on every ReLU.

Composes conf/ with the overrides given (as src/train.py does; one run, no sweep), trains it in-process
and prints, every N steps (ALLCONV_PROBE_EVERY, default 20) and at each epoch end, the train loss, the
gradient norm before the update cap, and for each ReLU the fraction of its outputs that are positive on
that step's batch; "dead" is a layer with none. Unlike scripts/dying_relu_probe.py (a plain loop on
batches drawn with replacement) the batches, seeds, cap and schedule are the run's own, so a cell of the
grid dies here exactly when it died in the grid.

    python scripts/relu_activity.py experiment=grid_cpu model=all_cnn_c optim.lr=0.25 trainer.max_epochs=4 \
        hydra.mode=RUN hydra.run.dir=outputs/relu_activity
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from allconv import callbacks, training

CONF = Path(__file__).resolve().parents[1] / "conf"
EVERY = int(os.environ.get("ALLCONV_PROBE_EVERY", 20))


class ReluActivity(L.Callback):
    def __init__(self):
        self.active: dict[int, float] = {}
        self.handles: list = []
        self.part_norms: dict[str, float] = {}

    def on_train_start(self, trainer, pl_module):
        named = [(n, m) for n, m in pl_module.net.named_modules() if isinstance(m, torch.nn.ReLU)]
        for k, (_, relu) in enumerate(named):
            self.handles.append(relu.register_forward_hook(
                lambda m, i, o, k=k: self.active.__setitem__(k, (o > 0).float().mean().item()) if m.training else None))
        print(f"columns: epoch step loss grad_norm, then the active fraction of each ReLU: "
              f"{', '.join(n for n, _ in named)}; then the gradient norm of each conv (before the cap)", flush=True)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Called before the cap clips the gradient: which layer a spike comes from.
        for name, m in pl_module.net.named_modules():
            if isinstance(m, torch.nn.Conv2d) and m.weight.grad is not None:
                g = torch.cat([m.weight.grad.flatten(), m.bias.grad.flatten()])
                self.part_norms[name] = g.norm().item()

    def on_train_epoch_start(self, trainer, pl_module):
        self.summed = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        last = batch_idx == trainer.num_training_batches - 1
        summed = float(pl_module._grad_norm_sum)  # the module's running sum of this epoch's gradient norms
        gnorm, self.summed = summed - self.summed, summed
        if batch_idx % EVERY == 0 or last:
            print(f"{trainer.current_epoch + 1} {batch_idx} {float(outputs['loss']):.3f} {gnorm:.2f} "
                  f"{[round(self.active[k], 3) for k in sorted(self.active)]} "
                  f"{[round(v, 2) for v in self.part_norms.values()]}" + ("  (epoch end)" if last else ""),
                  flush=True)

    def on_train_end(self, trainer, pl_module):
        for h in self.handles:
            h.remove()


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    run = Path(cfg.hydra.run.dir)
    if run.exists():
        sys.exit(f"error: {run} exists; choose another hydra.run.dir")
    with open_dict(cfg):
        del cfg["hydra"]
    build = callbacks.build_callbacks
    callbacks.build_callbacks = lambda c, d: build(c, d) + [ReluActivity()]
    training.train(cfg, run)


if __name__ == "__main__":
    main(sys.argv[1:])
