"""Lightning's per-step overhead, with the compute made negligible: where the host time goes.

    python benchmarks/overhead.py [--repeats 3] [--steps 150]

All-CNN-C at width 0.01, batch 32, one thread, 2 epochs of `steps` batches; process CPU time per
step (steadier than wall time on a shared CPU), median over interleaved repeats, for: the plain
loop, without and with the update cap; Lightning with a bare training_step; the real AllConvModule
(metrics summed on the device and logged per epoch, the update cap on), and without the cap; the
real module with the rich and tqdm progress bars. The difference to the plain loop is what a fast
GPU would see as extra host time per step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import AllConvModule, CIFARDataModule, L, logging, models, torch  # noqa: E402

F = torch.nn.functional


class BareModule(AllConvModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    bs, n = 32, a.steps * 32
    g = torch.Generator().manual_seed(0)
    t = {"x_train": torch.randn(n, 3, 32, 32, generator=g), "y_train": torch.randint(0, 10, (n,), generator=g),
         "x_test": torch.randn(16, 3, 32, 32, generator=g), "y_test": torch.randint(0, 10, (16,), generator=g)}

    def lightning(cls, bar=None, cap=0.125) -> float:
        dm = CIFARDataModule(source="npz", batch_size=bs)
        dm.tensors = t
        m = cls(dict(family="c", variant="allcnn", width=0.01), num_classes=10, max_update_norm=cap,
                channels_last=False)  # as the plain loop's network
        tr = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=2, limit_val_batches=0,
                       num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_model_summary=False,
                       enable_progress_bar=bar is not None, callbacks=[bar] if bar else [],
                       default_root_dir="/tmp/allconv-overhead")
        start = time.process_time()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            tr.fit(m, datamodule=dm)
        return (time.process_time() - start) / (2 * a.steps)

    def plain(cap=None) -> float:
        net = models.build("c", "allcnn", width=0.01)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        start = time.process_time()
        for _ in range(2):
            order = torch.randperm(n)
            for b in range(a.steps):
                idx = order[b * bs:(b + 1) * bs]
                F.cross_entropy(net(t["x_train"][idx]), t["y_train"][idx]).backward()
                if cap:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), cap / 0.05, foreach=True)
                opt.step()
                opt.zero_grad(set_to_none=True)
        return (time.process_time() - start) / (2 * a.steps)

    cb = L.pytorch.callbacks
    variants = {"plain loop": plain, "plain loop + update cap": lambda: plain(cap=0.125),
                "Lightning, bare training_step": lambda: lightning(BareModule, cap=None),
                "Lightning, real AllConvModule (update cap on)": lambda: lightning(AllConvModule),
                "real module, update cap off": lambda: lightning(AllConvModule, cap=None),
                "real module + RichProgressBar": lambda: lightning(AllConvModule, cb.RichProgressBar()),
                "real module + TQDMProgressBar": lambda: lightning(AllConvModule, cb.TQDMProgressBar())}
    res: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.repeats):
        for k, fn in variants.items():
            res[k].append(fn())
    base = statistics.median(res["plain loop"])
    print("| path | CPU ms / step | extra over plain |\n|---|---:|---:|")
    for k, v in res.items():
        print(f"| {k} | {1e3 * statistics.median(v):.2f} | {1e3 * (statistics.median(v) - base):+.2f} |")


if __name__ == "__main__":
    main()
