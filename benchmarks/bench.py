"""Training throughput of the 12 networks: the project's Lightning path against a plain PyTorch loop.

    python benchmarks/bench.py                                  # CPU: width 0.25, fp32, synthetic data
    python benchmarks/bench.py --data data/cifar10-jpeg-arrays.npz --steps 0 --width 1   # GPU: full epochs

Per network, in one process and on one set of device tensors:
  * Lightning path: the real AllConvModule + CIFARDataModule (its DeviceLoader) + L.Trainer, with
    the logger, checkpoints, progress bar and model summary off (the module's non-finite-loss
    guard and update cap on, as in a run);
  * plain loop: the same architecture and init, the same tensors, batch size, precision and SGD
    settings, in a bare `for` loop (device permutation, index slice, forward, backward, the same
    update cap -- the global gradient norm clipped to max_update_norm / lr --, step).
They are interleaved epoch by epoch: a callback runs one plain epoch at the start of each Lightning
epoch, so both see the same machine load. A Lightning epoch is timed from one epoch start to the
next, less the plain epoch inside it, so every hook, the per-epoch logging, the scheduler step and
the loader's new permutation are charged to Lightning. Each figure is the median over `repeats`
epochs after `warmup`; the ratio is the median of the per-epoch paired ratios (plain time /
Lightning time: 1.0 = no overhead).

An "epoch" here is `steps` batches (0 = the whole training set); epoch time for 50,000 images is
extrapolated from the measured rate when steps > 0. Achieved FLOP/s counts 6 x multiply-adds per
training image (forward 2, backward 4). Peak: the card's datasheet dense figure for the precision
used; on a CPU (no datasheet) the best of a few 2048^3 matrix products measured here in that
precision's dtype (fp32, or bf16 for the bf16 precisions).

Precisions: on a CPU, by default both 32-true and bf16-mixed, the one trainer.precision=auto picks
here first (allconv.precision: bf16-mixed only where the CPU does bf16 in hardware); on CUDA the one
auto picks. bench.json's "meta" and "rows" are the first precision's; "by_precision" holds each.
Writes bench.json and bench.md into --out (default outputs/bench/, so a run leaves the tree clean;
--out benchmarks/results refreshes the committed figures) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # works without `pip install -e` (the device machine)

import lightning as L  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from allconv import models  # noqa: E402
from allconv.data import CIFARDataModule  # noqa: E402
from allconv.module import AllConvModule  # noqa: E402
from allconv.precision import resolve as resolve_precision  # noqa: E402
from allconv.training import trainer_kwargs  # noqa: E402

EPOCH_IMAGES = 50_000
# Dense TFLOP/s from NVIDIA datasheets: (bf16, tf32, fp32). Matched on the device name, first hit wins.
PEAKS = [("H200", (989.4, 494.7, 66.9)), ("H100 PCIe", (756.0, 378.0, 51.2)), ("H100 NVL", (835.0, 417.5, 60.0)),
         ("H100", (989.4, 494.7, 66.9)), ("A100", (312.0, 156.0, 19.5)), ("L40S", (362.1, 183.0, 91.6)),
         ("A10", (125.0, 62.5, 31.2))]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, precision: str) -> tuple[float, str]:
    """The device's peak for this precision, and where the figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, tf32, fp32) in PEAKS:
            if key in name:
                if "bf16" in precision:
                    return bf16, f"{key} datasheet, dense bf16"
                if torch.backends.cudnn.allow_tf32:  # fp32 convolutions run as TF32 by default
                    return tf32, f"{key} datasheet, dense tf32"
                return fp32, f"{key} datasheet, fp32"
    # No datasheet: measure what a large matrix product reaches here, in the dtype the convolutions run in.
    dtype = torch.bfloat16 if "bf16" in precision else torch.float32
    n, best = 2048, float("inf")
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    for _ in range(4):
        sync(device)
        t = time.perf_counter()
        a @ a
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12, f"measured {'bf16' if dtype == torch.bfloat16 else 'fp32'} {n}^3 matmul"


def load_tensors(args, device: torch.device) -> dict[str, torch.Tensor]:
    """Training (and test) tensors on the device: synthetic, or an arrays file through the real pipeline."""
    if args.data == "synthetic":
        n = args.steps * args.batch_size if args.steps else EPOCH_IMAGES
        g = torch.Generator().manual_seed(0)
        t = {"x_train": torch.randn(n, 3, 32, 32, generator=g), "y_train": torch.randint(0, 10, (n,), generator=g),
             "x_test": torch.randn(16, 3, 32, 32, generator=g), "y_test": torch.randint(0, 10, (16,), generator=g)}
    else:
        dm = CIFARDataModule(source="npz", path=args.data, preprocess=args.preprocess, cache_dir=args.cache_dir)
        dm.setup()
        t = dm.tensors
    return {k: v.to(device) for k, v in t.items()}


class Interleave(L.Callback):
    """Runs one plain epoch at each Lightning epoch start; times both sides (Lightning: start to start).

    Wall time is the headline; the process's CPU time is kept too, as it hardly moves when other
    processes share the CPU (a CPU check's only clock that load does not bend much).
    """

    def __init__(self, plain_epoch, device):
        self.plain_epoch, self.device = plain_epoch, device
        self.lightning: list[tuple[float, float]] = []
        self.plain: list[tuple[float, float]] = []
        self._mark: tuple[float, float] | None = None

    def _now(self) -> tuple[float, float]:
        sync(self.device)
        return time.perf_counter(), time.process_time()

    def _lap(self) -> None:
        if self._mark is not None:
            now = self._now()
            self.lightning.append((now[0] - self._mark[0], now[1] - self._mark[1]))

    def on_train_epoch_start(self, trainer, pl_module):
        self._lap()
        start = self._now()
        self.plain_epoch()
        end = self._now()
        self.plain.append((end[0] - start[0], end[1] - start[1]))
        self._mark = self._now()

    def on_train_end(self, trainer, pl_module):
        self._lap()


def make_plain_epoch(net, tensors, args, device, precision: str, n_batches: int):
    """A bare training loop over the same tensors; returns a function that runs one epoch."""
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-3)
    x_all, y_all = tensors["x_train"], tensors["y_train"]
    bf16 = "bf16" in precision
    bs = args.batch_size

    def epoch() -> None:
        net.train()
        order = torch.randperm(len(x_all), device=device)
        for b in range(n_batches):
            idx = order[b * bs:(b + 1) * bs]
            x, y = x_all[idx], y_all[idx]
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            if args.max_update_norm:  # the project's update cap: lr * |g| <= max_update_norm
                torch.nn.utils.clip_grad_norm_(net.parameters(), args.max_update_norm / args.lr, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return epoch


def bench_one(family: str, variant: str, tensors, args, tkw: dict, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    net = models.build(family, variant, width=args.width)
    macs, params = models.count_macs(net), models.count_params(net)
    plain_net = net.to(device)
    if args.channels_last:
        plain_net = plain_net.to(memory_format=torch.channels_last)
    plain_fwd = torch.compile(plain_net) if args.compile else plain_net

    n_train = len(tensors["x_train"])
    full = -(-n_train // args.batch_size)
    n_batches = min(args.steps, full) if args.steps else full
    plain_epoch = make_plain_epoch(plain_fwd, tensors, args, device, tkw["precision"], n_batches)

    # source="npz": prepare_data downloads nothing; the tensors are already on the device, so setup()
    # and the loader's .to(device) are no-ops.
    dm = CIFARDataModule(source="npz", batch_size=args.batch_size, seed=args.seed)
    dm.tensors = dict(tensors)
    torch.manual_seed(args.seed)  # the module builds the same network with the same init
    module = AllConvModule(dict(family=family, variant=variant, width=args.width), num_classes=10, lr=args.lr,
                           max_update_norm=args.max_update_norm or None, compile=args.compile,
                           channels_last=args.channels_last)
    timer = Interleave(plain_epoch, device)
    callbacks = [timer]
    if args.progress_bar == "rich":
        callbacks.append(L.pytorch.callbacks.RichProgressBar())
    elif args.progress_bar == "tqdm":
        callbacks.append(L.pytorch.callbacks.TQDMProgressBar())
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(**{**tkw, **dict(
            default_root_dir=tmp, max_epochs=args.warmup + args.repeats, limit_train_batches=n_batches,
            limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=args.progress_bar != "none", callbacks=callbacks)})
        trainer.fit(module, datamodule=dm)

    lt, pt = [w for w, _ in timer.lightning[args.warmup:]], [w for w, _ in timer.plain[args.warmup:]]
    lc, pc = [c for _, c in timer.lightning[args.warmup:]], [c for _, c in timer.plain[args.warmup:]]
    images = min(n_batches * args.batch_size, n_train)
    ratios = [p / q for p, q in zip(pt, lt, strict=True)]
    l_ips, p_ips = images / statistics.median(lt), images / statistics.median(pt)
    return {
        "config": models.config_name(family, variant), "network": models.paper_name(family, variant),
        "params": params, "macs_per_image": macs, "images_per_epoch": images,
        "batches_per_epoch": n_batches, "lightning_s": lt, "plain_s": pt, "lightning_cpu_s": lc, "plain_cpu_s": pc,
        "lightning_img_s": l_ips, "plain_img_s": p_ips,
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "ratio_cpu_time": statistics.median(p / q for p, q in zip(pc, lc, strict=True)),
        # Lightning's extra time per training step (wall): what it would cost on a faster device.
        "overhead_ms_per_step": 1e3 * statistics.median(q - p for p, q in zip(pt, lt, strict=True)) / n_batches,
        "epoch_s": EPOCH_IMAGES / l_ips, "epoch_measured": images >= EPOCH_IMAGES,
        "tflops": 6 * macs * l_ips / 1e12,
    }


def markdown(meta: dict, rows: list[dict]) -> str:
    est = "" if all(r["epoch_measured"] for r in rows) else " (est.)"
    lines = [f"{meta['device_name']}, width {meta['width']}, {meta['precision']}, batch {meta['batch_size']}, "
             f"{meta['batches_per_epoch']} batches/epoch, median of {meta['repeats']} interleaved epochs "
             f"after {meta['warmup']} warm-up; data: {meta['data']}; peak {meta['peak_tflops']:.3g} TFLOP/s "
             f"({meta['peak_source']}); update cap {meta.get('max_update_norm') or 'off'} in both paths; "
             f"1-min load average before/after: {meta['load_before']} / "
             f"{meta['load_after']}", "",
             f"| network | params | MMAC/img | Lightning img/s | plain img/s | Lightning/plain, wall (min-max) "
             f"| Lightning/plain, CPU time | overhead ms/step | epoch s{est} | TFLOP/s | % peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['network']} | {r['params']:,} | {r['macs_per_image'] / 1e6:.1f} | "
                     f"{r['lightning_img_s']:,.0f} | {r['plain_img_s']:,.0f} | "
                     f"{r['ratio']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) | {r['ratio_cpu_time']:.3f} | "
                     f"{r['overhead_ms_per_step']:.2f} | "
                     f"{r['epoch_s']:.3g} | {r['tflops']:.3g} | {100 * r['tflops'] / meta['peak_tflops']:.1f} |")
    lines.append(f"| **all: median** (pooled time: wall {meta['pooled_ratio']:.3f}, CPU "
                 f"{meta['pooled_ratio_cpu_time']:.3f}) | | | | | **{meta['median_ratio']:.3f}** | "
                 f"**{meta['median_ratio_cpu_time']:.3f}** | | | | |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--networks", default="all", help="comma-separated config names (all_cnn_c,model_a,...) or 'all'")
    p.add_argument("--width", type=float, default=None, help="channel multiplier (default 0.25 on CPU, 1.0 on GPU)")
    p.add_argument("--steps", type=int, default=None, help="batches per epoch; 0 = whole set (default 6 CPU, 0 GPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per path (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first (cuDNN autotune, compile)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--max-update-norm", type=float, default=0.125,
                   help="the update cap of both paths (optim.max_update_norm); 0 = the paper's plain SGD")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto",
                   help="comma-separated, e.g. 32-true,bf16-mixed; auto: on a CPU both (trainer.precision=auto's "
                        "choice first), on CUDA auto's choice")
    p.add_argument("--data", default="synthetic", help="'synthetic' or an arrays .npz (GCN+ZCA as in training)")
    p.add_argument("--preprocess", default="gcn_zca", help="for --data npz: gcn_zca | standardize | none")
    p.add_argument("--cache-dir", default=None, help="ZCA fit cache (data.cache_dir)")
    p.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"], help="auto: on for CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (both paths)")
    p.add_argument("--progress-bar", default="none", choices=["none", "rich", "tqdm"], help="to measure its cost")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench"),
                   help="where bench.json/bench.md go; benchmarks/results holds the figures docs/PERFORMANCE.md cites")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module="lightning")  # deprecation notes from Lightning's internals
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banner lines
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        sys.exit("error: --device cuda but torch sees no CUDA device")
    device = torch.device("cuda" if cuda else "cpu")
    args.width = args.width if args.width is not None else (1.0 if cuda else 0.25)
    args.steps = args.steps if args.steps is not None else (0 if cuda else 6)
    args.channels_last = cuda if args.channels_last == "auto" else args.channels_last == "true"
    wanted = [n.strip() for n in args.networks.split(",")] if args.networks != "all" else None
    nets = [(f, v) for f, v in models.all_networks() if wanted is None or models.config_name(f, v) in wanted]
    if wanted is not None and len(nets) != len(wanted):
        known = ", ".join(models.config_name(f, v) for f, v in models.all_networks())
        sys.exit(f"error: unknown network in --networks {args.networks!r}; allowed: {known}")

    tensors = load_tensors(args, device)
    results = {p: bench_precision(p, nets, tensors, args, device, cuda) for p in bench_precisions(args.precision, cuda)}
    first = next(iter(results.values()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"meta": {**first["meta"], "precisions": list(results)},
                                                "rows": first["rows"], "by_precision": results}, indent=2) + "\n")
    table = "\n".join(markdown(r["meta"], r["rows"]) for r in results.values())
    if len(results) > 1:
        table += "\n" + compare_precisions(results)
    (out / "bench.md").write_text(table)
    print("\n" + table, flush=True)
    return {"meta": first["meta"], "rows": first["rows"], "by_precision": results}


def bench_precisions(asked: str, cuda: bool) -> list[str]:
    """The precisions to run: the ones asked for, or auto's choice here (and on a CPU the other of fp32/bf16)."""
    if asked != "auto":
        return [p.strip() for p in asked.split(",")]
    chosen = resolve_precision("auto", "gpu" if cuda else "cpu")[0]
    return [chosen] if cuda else [chosen, "bf16-mixed" if chosen == "32-true" else "32-true"]


def bench_precision(prec: str, nets, tensors, args, device: torch.device, cuda: bool) -> dict:
    """Every network in one precision: its rows and the table's header facts (peak measured in that precision)."""
    # The project's own resolution of benchmark="auto" (and of precision="auto").
    tkw = trainer_kwargs(OmegaConf.create({"trainer": {"accelerator": "gpu" if cuda else "cpu", "devices": 1,
                                                       "precision": prec, "benchmark": "auto"},
                                           "data": {"val_size": 0}}))
    auto = resolve_precision("auto", "gpu" if cuda else "cpu")
    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    peak, peak_source = (args.peak_tflops, "given") if args.peak_tflops else peak_tflops(device, tkw["precision"])
    rows = []
    for f, v in nets:
        r = bench_one(f, v, tensors, args, tkw, device)
        rows.append(r)
        print(f"{r['network']:>16} {tkw['precision']}: Lightning {r['lightning_img_s']:9,.0f} img/s  plain "
              f"{r['plain_img_s']:9,.0f} img/s  ratio {r['ratio']:.3f}  {r['tflops']:.3g} TFLOP/s", flush=True)
    cpu = f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    pooled = {k: sum(sum(r[f"plain{k}"]) for r in rows) / sum(sum(r[f"lightning{k}"]) for r in rows)
              for k in ("_s", "_cpu_s")}
    meta = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else cpu,
        "cpu_name": torch.cpu.get_capabilities().get("cpu_name") if not cuda else None,
        "torch": torch.__version__, "lightning": L.__version__, "width": args.width, "precision": tkw["precision"],
        "auto_precision": auto[0], "auto_reason": auto[1],  # what trainer.precision=auto picks here, and why
        "max_update_norm": args.max_update_norm or None,
        "cudnn_benchmark": tkw["benchmark"], "channels_last": args.channels_last, "compile": args.compile,
        "batch_size": args.batch_size, "batches_per_epoch": rows[0]["batches_per_epoch"], "repeats": args.repeats,
        "warmup": args.warmup, "data": args.data if args.data == "synthetic" else f"{Path(args.data).name} "
        f"({args.preprocess})", "progress_bar": args.progress_bar, "peak_tflops": peak, "peak_source": peak_source,
        "load_before": load_before, "load_after": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "pooled_ratio": pooled["_s"], "pooled_ratio_cpu_time": pooled["_cpu_s"],
        "median_ratio_cpu_time": statistics.median(r["ratio_cpu_time"] for r in rows),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return {"meta": meta, "rows": rows}


def compare_precisions(results: dict) -> str:
    """One row per network: each precision's Lightning img/s and % of that precision's measured peak."""
    names = list(results)
    base = names[0]
    head = " | ".join(f"{p} img/s | {p} % peak | {p} Lightning/plain" for p in names)
    speed = " | ".join(f"{p}/{base} speed" for p in names[1:])
    lines = [f"| network | {head} | {speed} |", "|---|" + "---:|" * (3 * len(names) + len(names) - 1)]
    by = {p: {r["config"]: r for r in results[p]["rows"]} for p in names}
    for r0 in results[base]["rows"]:
        c = r0["config"]
        cells = " | ".join(f"{by[p][c]['lightning_img_s']:,.0f} | "
                           f"{100 * by[p][c]['tflops'] / results[p]['meta']['peak_tflops']:.1f} | "
                           f"{by[p][c]['ratio']:.3f}" for p in names)
        ratios = " | ".join(f"{by[p][c]['lightning_img_s'] / r0['lightning_img_s']:.2f}" for p in names[1:])
        lines.append(f"| {r0['network']} | {cells} | {ratios} |")
    medians = " | ".join(f" | | **{results[p]['meta']['median_ratio']:.3f}**" for p in names)
    lines.append(f"| **all: median Lightning/plain** |{medians} |" + " |" * (len(names) - 1))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
