"""The device check's steps (run by scripts/device_check.sh): decode, benchmark, train, summarise.

1. Decode the JPEG copy of CIFAR-10 (JPEG bytes + offsets + labels, as in shared/data) to an arrays
   file, as shared/data/cifar10_jpeg_to_arrays.py does (PIL, RGB).
2. benchmarks/bench.py on it: the 12 networks, Lightning path vs plain loop, full epochs on a GPU.
3. All-CNN-C with the paper's recipe (SGD 0.9, wd 1e-3, lr x0.1 at 200/250/300 of 350 epochs)
   through src/train.py, for as many epochs as the time budget allows at the epoch time step 2
   measured; a shorter run scales the milestones the same way and says so.
4. A short table, printed last, and summary.json / summary.md in --out.

--dry-run runs the same steps on the CPU with tiny settings (a few hundred images, width 0.05,
two networks, two epochs) and data.preprocess=standardize, since a 3072x3072 ZCA eigendecomposition
alone takes ~40 s on a 2-core CPU. Nothing here imports wandb.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAPER_EPOCHS, PAPER_MILESTONES = 350, (200, 250, 300)


def decode(src: Path, out: Path, limit_train: int | None, limit_test: int | None) -> dict:
    from PIL import Image

    z = np.load(src)
    arrays = {}
    for split, limit in (("train", limit_train), ("test", limit_test)):
        blob, offs, labels = z[f"{split}_jpeg"], z[f"{split}_offsets"], z[f"{split}_labels"]
        n = len(labels) if limit is None else min(limit, len(labels))
        x = np.empty((n, 32, 32, 3), np.uint8)
        for i in range(n):
            x[i] = np.asarray(Image.open(io.BytesIO(blob[offs[i]:offs[i + 1]].tobytes())).convert("RGB"))
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, labels[:n].astype(np.int64)
    np.savez(out, **arrays, classes=z["classes"])
    return {k: v.shape for k, v in arrays.items()}


def schedule(epoch_s: float, seconds: float, cap: int = PAPER_EPOCHS) -> tuple[int, list[int], str]:
    """Epochs that fit in `seconds`, the paper's milestones scaled to them, and a label."""
    epochs = max(1, min(cap, PAPER_EPOCHS, math.floor(seconds / epoch_s)))
    milestones = [max(1, round(m * epochs / PAPER_EPOCHS)) for m in PAPER_MILESTONES]
    if epochs == PAPER_EPOCHS:
        return epochs, milestones, "paper recipe, 350 epochs"
    return epochs, milestones, f"shortened: {epochs} of 350 epochs, milestones scaled to {milestones}"


def run(cmd: list[str], timeout: float | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=timeout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "outputs" / "device_check"))
    p.add_argument("--work", default="/tmp/allconv-device-check", help="decoded data, ZCA cache, the training run")
    p.add_argument("--jpeg", default=str(ROOT / ".carry" / "cifar10-jpeg.npz"))
    p.add_argument("--budget-s", type=float, default=450.0, help="whole check, from this script's start")
    p.add_argument("--reserve-s", type=float, default=45.0, help="training run's start-up + test, outside epochs")
    p.add_argument("--safety", type=float, default=1.15, help="epoch time multiplier when sizing the schedule")
    p.add_argument("--bench-repeats", type=int, default=3)
    p.add_argument("--dry-run", action="store_true", help="tiny settings on the CPU")
    a = p.parse_args(argv)
    t0 = time.monotonic()
    out, work = Path(a.out).resolve(), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    py = sys.executable

    # 1. data
    jpeg = Path(a.jpeg)
    if not jpeg.is_file():
        sys.exit(f"error: {jpeg} not found; copy shared/data/cifar10-jpeg.npz there and carry its folder")
    arrays = work / "cifar10.npz"
    shapes = decode(jpeg, arrays, *((512, 256) if a.dry_run else (None, None)))
    print(f"decoded {jpeg} -> {arrays}: {shapes} ({time.monotonic() - t0:.0f} s)", flush=True)

    # 2. benchmark
    bench = [py, "benchmarks/bench.py", "--data", str(arrays), "--cache-dir", str(work / "zca"), "--out", str(out)]
    if a.dry_run:
        bench += ["--device", "cpu", "--networks", "all_cnn_c,model_a", "--width", "0.05", "--steps", "2",
                  "--repeats", "2", "--warmup", "1", "--preprocess", "standardize"]
    else:
        bench += ["--steps", "0", "--repeats", str(a.bench_repeats), "--warmup", "1"]
    run(bench)
    b = json.loads((out / "bench.json").read_text())
    meta, rows = b["meta"], {r["config"]: r for r in b["rows"]}
    c = rows["all_cnn_c"]
    cuda = meta["device"].startswith("cuda")

    # 3. train All-CNN-C for the longest schedule that fits
    n_train = shapes["x_train"][0]
    epoch_s = c["epoch_s"] * n_train / 50_000  # bench epochs are per 50,000 images
    left = a.budget_s - (time.monotonic() - t0) - a.reserve_s
    epochs, milestones, label = schedule(epoch_s * a.safety, left, cap=2 if a.dry_run else PAPER_EPOCHS)
    print(f"All-CNN-C epoch {epoch_s:.3g} s, {left:.0f} s left for epochs -> {label}", flush=True)
    train = [py, "src/train.py", "model=all_cnn_c", "data=npz", f"data.path={arrays}",
             f"data.cache_dir={work / 'zca'}", f"trainer.max_epochs={epochs}",
             f"optim.milestones=[{','.join(map(str, milestones))}]", "logger=csv", "callbacks.progress_bar=none",
             "callbacks.checkpoint.every_n_epochs=0", "callbacks.guided_backprop.every_n_epochs=0",  # no captum there
             "trainer.enable_progress_bar=false", "print_config=false",
             f"hydra.run.dir={work / 'train'}"]
    if a.dry_run:
        train += ["trainer=cpu", "model.width=0.05", "data.preprocess=standardize"]
    elif cuda:
        train += ["model.channels_last=true"]
    run(train, timeout=max(60.0, a.budget_s + 25 - (time.monotonic() - t0)))  # the call stays under 8 min
    m = json.loads((work / "train" / "metrics.json").read_text())
    shutil.copy(work / "train" / "metrics.json", out / "train_metrics.json")
    epoch_times = []
    for f in (work / "train").rglob("metrics.csv"):
        shutil.copy(f, out / "train_metrics.csv")
        with open(f) as fh:
            epoch_times += [float(r["epoch_time_s"]) for r in csv.DictReader(fh) if r.get("epoch_time_s")]

    # 4. summary
    train_epoch = statistics.median(epoch_times) if epoch_times else m["wall_time_s"] / max(1, m["epochs"])
    s = {"card": meta["device_name"], "precision": meta["precision"], "width": meta["width"],
         "bench_epoch_s": c["epoch_s"], "bench_epoch_measured": c["epoch_measured"], "img_s": c["lightning_img_s"],
         "plain_img_s": c["plain_img_s"], "tflops": c["tflops"], "pct_peak": 100 * c["tflops"] / meta["peak_tflops"],
         "peak_source": meta["peak_source"], "ratio": c["ratio"], "ratio_all_median": meta["median_ratio"],
         "schedule": label, "epochs": m["epochs"], "milestones": milestones, "train_epoch_s": train_epoch,
         "train_wall_s": m["wall_time_s"], "test_error": m["test_error"], "n_train": int(n_train),
         "n_test": int(shapes["x_test"][0]), "dry_run": a.dry_run, "check_s": time.monotonic() - t0}
    (out / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    table = ("| card | precision | All-CNN-C epoch s (bench) | img/s | % of peak | Lightning/plain (All-CNN-C; "
             "all 12) | schedule | train epoch s | test error (JPEG test) |\n"
             "|---|---|---:|---:|---:|---:|---|---:|---:|\n"
             f"| {s['card']} | {s['precision']} | {s['bench_epoch_s']:.3g}"
             f"{'' if s['bench_epoch_measured'] else ' (est.)'} | {s['img_s']:,.0f} | {s['pct_peak']:.1f} | "
             f"{s['ratio']:.3f}; {s['ratio_all_median']:.3f} | {label} | {train_epoch:.3g} | "
             f"{100 * s['test_error']:.2f}% ({s['n_test']:,} images) |\n")
    (out / "summary.md").write_text(table)
    print(f"\ndevice check{' (DRY RUN, CPU, tiny settings)' if a.dry_run else ''} done in {s['check_s']:.0f} s\n"
          + table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
