"""What accelerators promise on their datasheets: the denominator of a comparable MFU.

Megatron-LM and torchtitan report MFU against the dense (no sparsity) tensor-core peak of the
GPU model; a measured matmul rate is a useful second figure but moves with clocks, shapes and
a busy machine. Figures are NVIDIA's datasheet numbers for the SXM parts, in TFLOP/s; fp32 is
the non-tensor-core rate (TF32 matmuls, when enabled, can run faster than it).
"""

from __future__ import annotations

import torch

# name fragment (as torch.cuda.get_device_name reports it) -> dtype -> dense peak TFLOP/s.
# Longer fragments first: "H100 PCIe" must not fall through to "H100".
DATASHEET_TFLOPS: dict[str, dict[torch.dtype, float]] = {
    "A100": {torch.bfloat16: 312.0, torch.float16: 312.0, torch.float32: 19.5},
    "H100 PCIe": {torch.bfloat16: 756.0, torch.float16: 756.0, torch.float32: 51.2},
    "H100": {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9},
    "H200": {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9},
    "B200": {torch.bfloat16: 2250.0, torch.float16: 2250.0, torch.float32: 80.0},
}


def datasheet_peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The datasheet dense peak of this device for dtype, or None where it is not in the table
    (CPUs, other GPUs): callers then fall back to a measured rate and say so."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in DATASHEET_TFLOPS.items():
        if fragment in name:
            return peaks.get(dtype)
    return None
