"""trainer=ddp on CPU: 2 processes (gloo) through train.py; the ranks end with identical weights, the ZCA
is fitted by one rank and loaded from the cache by the other, and each rank trains on half the data."""

from __future__ import annotations

import json

import torch

from conftest import run_cli, write_npz


def test_two_process_ddp_on_cpu(tmp_path):
    data = write_npz(tmp_path / "data.npz", n_train=128, n_test=32)
    run, cache = tmp_path / "run", tmp_path / "zca"
    rc, out, err = run_cli("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data=npz",
                           f"data.path={data}", f"data.cache_dir={cache}", "model.width=0.125", "trainer.max_epochs=1",
                           "data.batch_size=32", "logger=none", "callbacks.progress_bar=none",
                           "trainer.enable_progress_bar=false", "print_config=false",
                           "callbacks.guided_backprop.every_n_epochs=0", f"hydra.run.dir={run}", cwd=tmp_path)
    assert rc == 0, err[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["ddp"]["world_size"] == 2
    ranks = m["ddp"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["weights"] == ranks[1]["weights"] and m["ddp"]["weights_identical"]
    assert sorted(r["zca_loaded_from_cache"] for r in ranks) == [False, True]  # fitted once, loaded once
    assert len(list(cache.glob("zca-*.pt"))) == 1
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 128 // 2 // 32  # each rank stepped through its half of the data
