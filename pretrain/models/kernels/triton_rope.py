"""Triton rotary position embedding (rotate-half convention, as gpt.apply_rope).

The kernel reads and writes through explicit strides, so q/k may be the non-contiguous
[b, heads, s, d] views that the fused QKV split produces; reading and writing the same pointers
makes it in place. Backward applies the transposed rotation (the inverse rotation for
rope_tables' tables) to the incoming gradients, into fresh tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_S = 16


@triton.jit
def _rope_kernel(
    x_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    heads,
    seq,
    half,
    sxb,
    sxh,
    sxs,
    sxd,
    sob,
    soh,
    sos,
    sod,
    cs_stride,
    BACKWARD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    pos = (tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)[:, None]  # [BLOCK_S, 1]
    d = tl.arange(0, BLOCK_H)[None, :]  # [1, BLOCK_H]
    mask = (pos < seq) & (d < half)
    x_row = x_ptr + b * sxb + h * sxh + pos * sxs
    x1 = tl.load(x_row + d * sxd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + (d + half) * sxd, mask=mask, other=0.0).to(tl.float32)
    cs = pos * cs_stride + d
    c1 = tl.load(cos_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + half, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    o_row = out_ptr + b * sob + h * soh + pos * sos
    tl.store(o_row + d * sod, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + (d + half) * sod, o2.to(out_ptr.dtype.element_ty), mask=mask)


def _tables(cos: torch.Tensor, sin: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s, d = x.shape[-2], x.shape[-1]
    if cos.shape[0] < s or cos.shape[-1] != d or sin.shape != cos.shape:
        raise ValueError(f"rope tables {tuple(cos.shape)}/{tuple(sin.shape)} do not cover [s={s}, d={d}]")
    cos, sin = cos[:s], sin[:s]
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def rope_into(
    x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backward: bool = False
) -> torch.Tensor:
    """out = rope(x) (or its transpose when backward); x and out [b, heads, s, d], any strides;
    out may be x itself."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope takes [b, heads, s, d] with an even d, got {tuple(x.shape)}")
    b, heads, s, d = x.shape
    cos, sin = _tables(cos, sin, x)
    if x.numel():
        grid = (b * heads, triton.cdiv(s, BLOCK_S))
        _rope_kernel[grid](
            x,
            out,
            cos,
            sin,
            heads,
            s,
            d // 2,
            *x.stride(),
            *out.stride(),
            cos.stride(0),
            BACKWARD=backward,
            BLOCK_S=BLOCK_S,
            BLOCK_H=triton.next_power_of_2(d // 2),
            num_warps=4,
        )
    return out


def _backward(grad: torch.Tensor, cos, sin) -> torch.Tensor:
    if grad is None:
        return None
    return rope_into(grad, torch.empty(grad.shape, dtype=grad.dtype, device=grad.device), cos, sin, backward=True)


class _RopeInPlace(torch.autograd.Function):
    # One tensor per Function: autograd lets a Function that modifies a view in place return
    # only that one tensor.
    @staticmethod
    def forward(ctx, x, cos, sin):
        rope_into(x, x, cos, sin)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _backward(grad, cos, sin), None, None


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        q_out = rope_into(q, torch.empty(q.shape, dtype=q.dtype, device=q.device), cos, sin)
        k_out = rope_into(k, torch.empty(k.shape, dtype=k.dtype, device=k.device), cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        return _backward(grad_q, cos, sin), _backward(grad_k, cos, sin), None, None


def apply_rope_(q, k, cos, sin):
    return _RopeInPlace.apply(q, cos, sin), _RopeInPlace.apply(k, cos, sin)


def apply_rope(q, k, cos, sin):
    return _Rope.apply(q, k, cos, sin)
