"""trainer.precision=auto: its choice for each answer of the CPU capability query, and the run's record of it."""

from __future__ import annotations

import json

import pytest
import torch

from allconv import precision, torch_private, training
from conftest import write_npz

NO_BF16 = {"avx512_bf16": False, "amx_bf16": False, "amx_tile": False}
AVX512_BF16 = {"avx512_bf16": True, "amx_bf16": False, "amx_tile": False}
AMX = {"avx512_bf16": True, "amx_bf16": True, "amx_tile": True}


@pytest.fixture
def cpu(monkeypatch):
    """cpu(capabilities, onednn=True): what torch reports about this CPU, replaced; no CUDA."""

    def make(caps: dict, onednn: bool = True) -> None:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
        monkeypatch.setattr(torch_private, "onednn_bf16_supported", lambda: onednn)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        precision.cpu_bf16.cache_clear()

    yield make
    precision.cpu_bf16.cache_clear()


def test_the_private_torch_names_exist():
    """If torch renames what torch_private reads, this fails here rather than auto silently choosing fp32."""
    assert isinstance(torch_private.onednn_bf16_supported(), bool)
    caps = torch.cpu.get_capabilities()
    assert {"amx_bf16", "amx_tile", "avx512_bf16"} <= set(caps)


@pytest.mark.parametrize("caps, onednn, expected, why", [
    (AMX, True, "bf16-mixed", "AMX"),
    (AVX512_BF16, True, "32-true", "no AMX"),
    (NO_BF16, True, "32-true", "emulated"),
    (AMX, False, "32-true", "oneDNN"),
])
def test_auto_on_the_cpu_follows_the_hardware(cpu, caps, onednn, expected, why):
    cpu(caps, onednn)
    for accelerator in ("auto", "cpu"):
        chosen, reason = precision.resolve("auto", accelerator)
        assert chosen == expected and why in reason, (accelerator, chosen, reason)


def test_a_precision_asked_for_is_kept_and_cuda_gets_bf16(cpu, monkeypatch):
    cpu(AMX)
    assert precision.resolve("32-true", "cpu") == ("32-true", "trainer.precision=32-true")
    cpu(NO_BF16)
    assert precision.resolve("bf16-mixed", "cpu")[0] == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision.resolve("auto", "auto") == ("bf16-mixed", "CUDA")
    assert precision.resolve("auto", "cpu")[0] == "32-true"  # asked for the CPU on a CUDA machine


def test_trainer_kwargs_resolve_auto_through_the_query(cpu, compose_cfg):
    cpu(AMX)
    assert training.trainer_kwargs(compose_cfg("trainer=cpu"))["precision"] == "bf16-mixed"
    assert training.trainer_kwargs(compose_cfg("trainer=cpu", "trainer.precision=32-true"))["precision"] == "32-true"
    cpu(AVX512_BF16)
    assert training.trainer_kwargs(compose_cfg("trainer=cpu"))["precision"] == "32-true"


@pytest.mark.parametrize("caps, expected, why", [(AMX, "bf16-mixed", "AMX"), (NO_BF16, "32-true", "emulated")])
def test_a_run_records_its_precision_and_why(cpu, compose_cfg, tmp_path, shared_cache_dir, capsys, caps, expected,
                                             why):
    cpu(caps)
    npz = write_npz(tmp_path / "tiny.npz", n_train=48, n_test=20)
    cfg = compose_cfg("data=npz", f"data.path={npz}", f"data.cache_dir={shared_cache_dir}", "model.width=0.125",
                      "trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                      "callbacks.progress_bar=none", "data.batch_size=16", "data.eval_batch_size=16", "logger=none",
                      "data.preprocess=standardize")
    training.train(cfg, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["precision"] == expected and why in m["precision_reason"]
    out = capsys.readouterr().out.splitlines()
    assert f"precision: {expected} ({m['precision_reason']})" in out
    assert [line for line in out if line.startswith("estimate:")][0].endswith(f"of training on cpu in {expected}")
