"""One All-CNN-C training step on the CPU in fp32 and in bf16 autocast, side by side, and a profile of one step.

    python benchmarks/precision_step.py                      # matmul peaks, then steps at width 1.0 and 0.25
    python benchmarks/precision_step.py --profile bf16 --width 1 --channels-last true   # where one step goes

The step is the project's: forward, cross-entropy, backward, the update cap (global gradient norm clipped, as
AllConvModule does), SGD momentum 0.9 with weight decay. Every configuration is timed in turn, round after round,
so a load change on a shared machine bends all of them alike: compare ratios within one run, not absolute times
across runs. Each figure is the median over the rounds; the 1-minute load average is printed beside it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from allconv import models, precision  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def matmul_tflops(dtype: torch.dtype, n: int = 2048, tries: int = 4) -> tuple[float, float]:
    """The best of a few n^3 products, per wall second and per CPU second: the peak this CPU reaches in this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, best_cpu = float("inf"), float("inf")
    for _ in range(tries):
        t, tc = time.perf_counter(), time.process_time()
        a @ b
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - tc)
    return 2 * n**3 / best / 1e12, 2 * n**3 / best_cpu / 1e12


def make_step(width: float, dtype: torch.dtype, channels_last: bool, batch: int, compile: bool = False):
    torch.manual_seed(0)
    net = models.build("c", "allcnn", width=width)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    fwd = torch.compile(net) if compile else net
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.125 / 0.05, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, models.count_macs(net)


def compare(widths, layouts, batch: int, rounds: int, steps: int, compile: bool) -> list[dict]:
    configs = list(itertools.product(widths, layouts, DTYPES))
    steps_by = {c: make_step(c[0], DTYPES[c[2]], c[1], batch, compile) for c in configs}
    for step, _ in steps_by.values():  # warm-up: allocation, oneDNN primitive creation, compilation
        step()
        step()
    times = {c: [] for c in configs}
    cpu = {c: [] for c in configs}
    for _ in range(rounds):
        for c in configs:
            t, tc = time.perf_counter(), time.process_time()
            for _ in range(steps):
                steps_by[c][0]()
            times[c].append((time.perf_counter() - t) / steps)
            cpu[c].append((time.process_time() - tc) / steps)
    rows = []
    for c in configs:
        med = statistics.median(times[c])
        rows.append({"width": c[0], "channels_last": c[1], "dtype": c[2], "step_ms": 1e3 * med,
                     "cpu_ms": 1e3 * statistics.median(cpu[c]), "img_s": batch / med,
                     "tflops": 6 * steps_by[c][1] * batch / med / 1e12,
                     "tflops_cpu": 6 * steps_by[c][1] * batch / statistics.median(cpu[c]) / 1e12})
    return rows


def profile(width: float, dtype: str, channels_last: bool, batch: int, compile: bool, rows: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step, _ = make_step(width, DTYPES[dtype], channels_last, batch, compile)
    for _ in range(3):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", default="1,0.25")
    p.add_argument("--channels-last", default="both", choices=["both", "true", "false"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps per timed round of one configuration")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--profile", choices=list(DTYPES), default=None, help="profile 3 steps in this dtype instead")
    p.add_argument("--width", type=float, default=1.0, help="for --profile")
    p.add_argument("--rows", type=int, default=25, help="for --profile")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layouts = {"both": [True, False], "true": [True], "false": [False]}[args.channels_last]
    cap = precision.cpu_bf16()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; bf16: {cap.reason}")
    if args.profile:
        print(profile(args.width, args.profile, layouts[0], args.batch_size, args.compile, args.rows))
        return
    before = load()
    peaks = {k: matmul_tflops(d) for k, d in DTYPES.items()}
    print("matmul 2048^3, TFLOP/s per wall second (per CPU second): "
          + ", ".join(f"{k} {w:.3g} ({c:.3g})" for k, (w, c) in peaks.items()) + f"; load {before} / {load()}")
    before = load()
    rows = compare([float(w) for w in args.widths.split(",")], layouts, args.batch_size, args.rounds, args.steps,
                   args.compile)
    print(f"All-CNN-C, batch {args.batch_size}, SGD + update cap, compile {args.compile}, median of {args.rounds} "
          f"rounds x {args.steps} steps; load before/after {before} / {load()}")
    # Process CPU time beside wall time: on a shared machine it bends much less with the load.
    # % peak per CPU second: the step's FLOP per CPU second against the matmul's, both in the step's dtype.
    print("| width | channels_last | precision | ms/step (wall) | CPU ms/step | img/s | TFLOP/s | TFLOP/s per CPU s "
          "| % of that dtype's matmul peak (CPU time) | bf16/fp32 speed, wall | bf16/fp32 speed, CPU time |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    fp32 = {(r["width"], r["channels_last"]): r for r in rows if r["dtype"] == "fp32"}
    for r in rows:
        base = fp32[(r["width"], r["channels_last"])]
        print(f"| {r['width']:g} | {r['channels_last']} | {r['dtype']} | {r['step_ms']:.1f} | {r['cpu_ms']:.1f} | "
              f"{r['img_s']:,.0f} | {r['tflops']:.3g} | {r['tflops_cpu']:.3g} | "
              f"{100 * r['tflops_cpu'] / peaks[r['dtype']][1]:.0f} | {base['step_ms'] / r['step_ms']:.2f} | "
              f"{base['cpu_ms'] / r['cpu_ms']:.2f} |")


if __name__ == "__main__":
    main()
