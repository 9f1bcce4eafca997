"""The private torch names the project reads, in one place: tests/test_precision.py fails when torch renames one.

Only oneDNN's own answer to "does bf16 work here" has no public name (torch.ops.mkldnn._is_mkldnn_bf16_supported):
autocast's bf16 convolutions run through oneDNN, so its answer is the one that counts.
"""

from __future__ import annotations

import torch


def onednn_bf16_supported() -> bool:
    """Whether oneDNN runs bf16 on this CPU at all (natively or emulated on AVX-512)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
