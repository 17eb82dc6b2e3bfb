"""Triton SwiGLU: h [..., 2f] = [gate; up] -> silu(gate) * up, and its backward into d(h).

One program per (row, column block); fp32 inside. Saves only h: the backward recomputes the
sigmoid instead of keeping silu(gate) (a [.., f] activation) alive between the passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pretrain.models.kernels.triton_common import as_rows

BLOCK_MAX = 1024


@triton.jit
def _swiglu_fwd(h_ptr, y_ptr, h_stride, y_stride, f, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    gate = tl.load(h_ptr + row * h_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * h_stride + f + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(dy_ptr, h_ptr, dh_ptr, dy_stride, h_stride, dh_stride, f, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    dy = tl.load(dy_ptr + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(h_ptr + row * h_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * h_stride + f + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # d silu(g)/dg = sig * (1 + g * (1 - sig))
    d_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = dy * silu
    tl.store(dh_ptr + row * dh_stride + cols, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + row * dh_stride + f + cols, d_up.to(dh_ptr.dtype.element_ty), mask=mask)


def _grid(rows: int, f: int) -> tuple[tuple[int, int], int]:
    block = min(BLOCK_MAX, triton.next_power_of_2(f))
    return (rows, triton.cdiv(f, block)), block


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        if h.shape[-1] % 2:
            raise ValueError(f"swiglu needs an even last dim ([gate; up]), got {h.shape[-1]}")
        h2 = as_rows(h)  # [M, 2f]
        f = h2.shape[1] // 2
        y = torch.empty((h2.shape[0], f), dtype=h.dtype, device=h.device)
        grid, block = _grid(h2.shape[0], f)
        if h2.shape[0] and f:
            _swiglu_fwd[grid](h2, y, h2.stride(0), y.stride(0), f, BLOCK=block, num_warps=4)
        ctx.save_for_backward(h2)
        ctx.shape = h.shape
        return y.view(*h.shape[:-1], f)

    @staticmethod
    def backward(ctx, dy):
        (h2,) = ctx.saved_tensors
        f = h2.shape[1] // 2
        dy2 = as_rows(dy)
        dh = torch.empty(h2.shape, dtype=h2.dtype, device=h2.device)
        grid, block = _grid(h2.shape[0], f)
        if h2.shape[0] and f:
            _swiglu_bwd[grid](dy2, h2, dh, dy2.stride(0), h2.stride(0), dh.stride(0), f, BLOCK=block, num_warps=4)
        return dh.view(ctx.shape)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(h)
