"""Launch helpers shared by the Triton kernels."""

from __future__ import annotations

import functools

import torch
import triton

from pretrain.models.kernels import MAX_NORM_WIDTH

# A row is held whole in registers by the row-wise kernels (norms); past 8192 elements the
# backward spills at any warp count (cuobjdump on sm_90), so wider rows take the reference.
MAX_ROW_BLOCK = MAX_NORM_WIDTH


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with unit stride along N (a view when possible, else a copy)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()


def row_block(n_cols: int) -> int:
    block = triton.next_power_of_2(n_cols)
    if block > MAX_ROW_BLOCK:
        raise ValueError(
            f"rows of {n_cols} elements are wider than the fused kernels take "
            f"({MAX_ROW_BLOCK}); set PRETRAIN_KERNELS=torch"
        )
    return block


def row_warps(block: int) -> int:
    """Warps for one row of `block` elements: 256 elements a warp (8 per thread), 1 to 32. At
    fewer, the norm backward's registers pass 128 a thread at 4096+ and spill at 8192."""
    return max(1, min(32, block // 256))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def grid_programs(device: torch.device) -> int:
    """Programs for a persistent (row-striding) kernel: a few per SM on CUDA; a few on CPU,
    where the interpreter runs programs one after another."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4
