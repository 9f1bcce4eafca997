"""trainer=ddp on CPU: 2 processes (gloo) through train.py, alone and as each job of a 2-job `-m` multirun. The
ranks end with identical weights, the ZCA is fitted by one rank and loaded from the cache by the other, and each
rank trains on half the data; in a multirun every job relaunches its own ranks into its own folder."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, run_cli, write_npz

pytestmark = [pytest.mark.subprocess, pytest.mark.system]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=32", "logger=none"]


def check_ranks(metrics: dict) -> list[dict]:
    assert metrics["status"] == "finished" and metrics["ddp"]["world_size"] == 2
    ranks = metrics["ddp"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["weights"] == ranks[1]["weights"] and metrics["ddp"]["weights_identical"]
    return ranks


def test_two_process_ddp_on_cpu(tmp_path):
    data = write_npz(tmp_path / "data.npz", n_train=128, n_test=32)
    run, cache = tmp_path / "run", tmp_path / "zca"
    rc, out, err = run_cli(*TINY, *DDP, "data=npz", f"data.path={data}", f"data.cache_dir={cache}",
                           f"hydra.run.dir={run}", cwd=tmp_path)
    assert rc == 0, err[-3000:]
    ranks = check_ranks(json.loads((run / "metrics.json").read_text()))
    assert sorted(r["zca_loaded_from_cache"] for r in ranks) == [False, True]  # fitted once, loaded once
    assert len(list(cache.glob("zca-*.pt"))) == 1
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 128 // 2 // 32  # each rank stepped through its half of the data


def test_ddp_with_the_default_progress_bar_reaches_the_end(tmp_path):
    """The rich bar lives on rank 0 only and reads the epoch's metrics there: nothing it reads may need a collective
    (a reduction that rank 1 never joins hangs both ranks at the first epoch end)."""
    data = write_npz(tmp_path / "data.npz", n_train=128, n_test=32)
    run = tmp_path / "run"
    quiet = [o for o in TINY if "progress_bar" not in o]
    rc, out, err = run_cli(*quiet, *DDP, "trainer.max_epochs=2", "callbacks.progress_bar=rich", "data=npz",
                           f"data.path={data}", f"hydra.run.dir={run}", cwd=tmp_path, timeout=240)
    assert rc == 0, err[-3000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2


def test_ddp_inside_a_two_job_multirun(tmp_path):
    """Each job starts its own rank 1 (not the whole sweep again) and writes its own metrics.json."""
    data = write_npz(tmp_path / "data.npz", n_train=64, n_test=16)
    sweep = tmp_path / "sweep"
    rc, out, err = run_cli("-m", *TINY, *DDP, "data=npz", f"data.path={data}", "data.preprocess=standardize",
                           "seed=1,2", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job${hydra.job.num}",
                           cwd=tmp_path)
    assert rc == 0, err[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["job0", "job1"]  # no folder of a relaunched sweep, no third job
    weights = []
    for job, seed in (("job0", 1), ("job1", 2)):
        m = json.loads((sweep / job / "metrics.json").read_text())
        assert m["seed"] == seed
        ranks = check_ranks(m)
        weights.append(ranks[0]["weights"])
        ckpt = torch.load(sweep / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 64 // 2 // 32
    assert weights[0] != weights[1]  # two jobs, two seeds: two trainings, not one run twice
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


def test_a_signal_to_one_rank_stops_every_rank_after_one_step_and_resumes_exactly(tmp_path):
    """Ranks started by the cluster (SLURM tasks, torchrun), as here by hand, rank 1 first (it must leave the run
    folder to rank 0): a signal reaches each rank on its own,
    and Lightning shares it only at the start of a step while its checks after a step read each rank's own flag.
    SIGTERM to rank 0 alone must stop both ranks after the same step, with one checkpoint (a rank that stopped
    alone would leave the other waiting in the next step's collective), and the resumed run must end with the
    uninterrupted run's weights."""
    import os
    import re
    import signal
    import socket
    import subprocess
    import time

    from conftest import PYTHON, TRAIN_PY

    data = write_npz(tmp_path / "data.npz", n_train=256, n_test=32)
    common = [*TINY, *[o for o in DDP if o != "data.batch_size=32"], "data.batch_size=16", "trainer.max_epochs=3",
              "data=npz", f"data.path={data}", "data.preprocess=standardize"]
    rc, _, err = run_cli(*common, f"hydra.run.dir={tmp_path / 'reference'}", cwd=tmp_path)
    assert rc == 0, err[-3000:]

    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", "NODE_RANK": "0"}
    logs = [tmp_path / f"rank{r}.txt" for r in (0, 1)]
    ranks = {}
    for r in (1, 0):  # rank 1 first: its Hydra makes the run folder, and must leave it to rank 0 (no .hydra of its own)
        with logs[r].open("w") as out:
            ranks[r] = subprocess.Popen([PYTHON, str(TRAIN_PY), *common, f"hydra.run.dir={run}"], cwd=tmp_path,
                                        env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=out,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while r == 1 and not run.is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1 if r == 1 else 0)  # what rank 1 would write next to the folder, it has written by now
    ranks = [ranks[0], ranks[1]]
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in ranks), logs[0].read_text()[-3000:]
            time.sleep(0.05)
        ranks[0].send_signal(signal.SIGTERM)  # rank 0 only; rank 1 gets no signal
        codes = [p.wait(timeout=60) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    err = logs[0].read_text() + logs[1].read_text()
    assert codes == [128 + signal.SIGTERM] * 2, err[-3000:]
    stops = re.findall(r"interrupted by SIGTERM at (epoch \d+, step \d+ of \d+): saved", err)
    assert len(stops) == 2 and stops[0] == stops[1], err[-3000:]  # both ranks, after the same step
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]

    rc, _, err = run_cli(f"resume={run}", cwd=tmp_path)
    assert rc == 0, err[-3000:]
    ours, reference = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
                       for d in (run, tmp_path / "reference"))
    assert ours["global_step"] == reference["global_step"] == 3 * 256 // 2 // 16
    assert all(torch.equal(ours["state_dict"][k], v) for k, v in reference["state_dict"].items())
