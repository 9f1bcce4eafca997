"""trainer.precision=auto: the precision a run trains in, and why.

CUDA: bf16-mixed. CPU: bf16-mixed only where the processor does bf16 matrix products in hardware (AMX: Intel
Sapphire Rapids and later); elsewhere bf16 is emulated or too slow to pay (see docs/PERFORMANCE.md) and a run
trains in 32-true. The capability comes from torch (torch.cpu.get_capabilities, oneDNN), never from /proc/cpuinfo.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from allconv import torch_private


@dataclass(frozen=True)
class CpuBf16:
    fast: bool   # bf16-mixed trains faster than 32-true here
    reason: str


@lru_cache(maxsize=1)
def cpu_bf16() -> CpuBf16:
    """What this CPU does with bf16, as torch reports it."""
    caps = torch.cpu.get_capabilities()
    if not torch_private.onednn_bf16_supported():
        return CpuBf16(False, "oneDNN has no bf16 on this CPU")
    if caps.get("amx_bf16"):
        return CpuBf16(True, "the CPU does bf16 in hardware: AMX")
    if caps.get("avx512_bf16"):
        # Measured on an AMD EPYC with avx512_bf16 (docs/PERFORMANCE.md): a bf16 training step ran between 0.6x
        # and 2.7x the speed of fp32 with the thread count and the load, never a steady gain.
        return CpuBf16(False, "the CPU has avx512_bf16 but no AMX: bf16 not reliably faster than fp32 there")
    return CpuBf16(False, "the CPU has no bf16 instructions: bf16 would be emulated, slower than fp32")


def resolve(requested: str, accelerator: str = "auto") -> tuple[str, str]:
    """(precision, reason) for trainer.precision=requested on trainer.accelerator=accelerator."""
    if requested != "auto":
        return requested, f"trainer.precision={requested}"
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed", "CUDA"
    if accelerator not in ("auto", "cpu"):
        return "32-true", f"auto on accelerator {accelerator}"
    cpu = cpu_bf16()
    return ("bf16-mixed" if cpu.fast else "32-true"), cpu.reason
