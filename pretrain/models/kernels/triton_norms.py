"""Triton RMSNorm and LayerNorm over the last dim, forward and backward.

One program normalises one row held whole in registers (the hidden size is at most a few
thousand), computing in fp32. Backward runs a fixed number of programs, each striding over rows
and accumulating its partial weight/bias gradient in registers; the [programs, N] partials are
summed by torch afterwards, which is deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pretrain.models.kernels.triton_common import as_rows, grid_programs, row_block, row_warps


@triton.jit
def _norm_fwd(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    x_stride,
    y_stride,
    n_cols,
    eps,
    RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(mean_ptr + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(
    dy_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dw_ptr,
    db_ptr,
    dy_stride,
    x_stride,
    dx_stride,
    n_rows,
    n_cols,
    RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    # int64 row index (the loop variable takes the start's type): row * stride may pass 2^31.
    for row in range(pid.to(tl.int64), n_rows, programs):
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
        g = dy
        if HAS_W:
            # Reloaded per row (an L1/L2 hit) rather than held: wide rows run out of registers.
            g = dy * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        # d/dx of (x - mean) * rstd: project out the components along xhat (and the mean).
        dx = g - xhat * (tl.sum(g * xhat, axis=0) / n_cols)
        if not RMS:
            dx = dx - tl.sum(g, axis=0) / n_cols
        tl.store(dx_ptr + row * dx_stride + cols, (dx * rstd).to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += dy * xhat
        if HAS_B:
            db += dy
    if HAS_W:
        tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)
    if HAS_B:
        tl.store(db_ptr + pid * n_cols + cols, db, mask=mask)


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        shape = x.shape
        x2 = as_rows(x)  # [M, N]
        n_rows, n_cols = x2.shape
        block = row_block(n_cols)
        y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        mean = rstd if rms else torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if n_rows:
            _norm_fwd[(n_rows,)](
                x2,
                weight if weight is not None else x2,
                bias if bias is not None else x2,
                y,
                mean,
                rstd,
                x2.stride(0),
                y.stride(0),
                n_cols,
                eps,
                RMS=rms,
                HAS_W=weight is not None,
                HAS_B=bias is not None,
                BLOCK=block,
                num_warps=row_warps(block),
            )
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.rms, ctx.has_bias, ctx.shape = rms, bias is not None, shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = as_rows(dy)
        block = row_block(n_cols)
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        programs = max(1, min(n_rows, grid_programs(x2.device)))
        has_w = weight is not None
        dw = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device) if has_w else None
        db = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device) if ctx.has_bias else None
        if n_rows:
            _norm_bwd[(programs,)](
                dy2,
                x2,
                weight if has_w else x2,
                mean,
                rstd,
                dx,
                dw if has_w else rstd,
                db if db is not None else rstd,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                n_rows,
                n_cols,
                RMS=ctx.rms,
                HAS_W=has_w,
                HAS_B=ctx.has_bias,
                BLOCK=block,
                num_warps=row_warps(block),
            )
        grad_w = dw.sum(0).to(weight.dtype) if has_w and n_rows else (torch.zeros_like(weight) if has_w else None)
        grad_b = (
            db.sum(0).to(ctx.bias_dtype)
            if db is not None and n_rows
            else (torch.zeros(n_cols, dtype=ctx.bias_dtype, device=x2.device) if ctx.has_bias else None)
        )
        return dx.view(ctx.shape), grad_w, grad_b, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _Norm.apply(x, weight, None, eps, True)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _Norm.apply(x, weight, bias, eps, False)
