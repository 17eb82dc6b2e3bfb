"""Triton (vocab-parallel) cross-entropy that never materialises an fp32 softmax.

Forward: one program per row streams the row's logits chunk by chunk, keeping an online
(max, sum-exp) pair and picking up the target logit: [N] numbers per row leave the kernel.
Under tensor parallelism the per-rank triples are combined as Megatron does: all-reduce MAX of
the row max, rescale the local sum-exp to it, then one SUM all-reduce of [sum-exp; target].
Backward: (softmax - onehot) * grad recomputed from the saved logits and log-sum-exp, written in
the logits' dtype, optionally over the logits themselves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from pretrain.models.kernels.triton_common import as_rows
from pretrain.models.loss import IGNORE_INDEX
from pretrain.parallel.comm import all_reduce, group_size

BLOCK_FWD = 4096
BLOCK_BWD = 4096


@triton.jit
def _ce_fwd(logits_ptr, labels_ptr, max_ptr, sums_ptr, stride, n_rows, n_valid, vocab_start, BLOCK: tl.constexpr):
    # n_valid: this rank's real (non-padding) columns, a prefix of its slice.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    m = float("-inf")
    s = 0.0
    for start in range(0, n_valid, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    local = tl.load(labels_ptr + row) - vocab_start
    mine = (local >= 0) & (local < n_valid)
    target = tl.load(base + tl.where(mine, local, 0), mask=mine, other=0.0).to(tl.float32)
    tl.store(max_ptr + row, m)
    tl.store(sums_ptr + row, s)
    tl.store(sums_ptr + n_rows + row, tl.where(mine, target, 0.0))


@triton.jit
def _ce_bwd(
    logits_ptr,
    grad_ptr,
    labels_ptr,
    lse_ptr,
    scale_ptr,
    stride,
    grad_stride,
    n_cols,
    n_valid,
    vocab_start,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    x = tl.load(logits_ptr + row * stride + cols, mask=in_row, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)  # d loss_row; 0 on ignored rows
    local = tl.load(labels_ptr + row) - vocab_start
    p = tl.where(cols < n_valid, tl.exp(x - lse), 0.0)  # padding columns get no gradient
    p = p - tl.where(cols == local, 1.0, 0.0)
    tl.store(grad_ptr + row * grad_stride + cols, (p * scale).to(grad_ptr.dtype.element_ty), mask=in_row)


def _n_valid(local_vocab: int, vocab_start: int, vocab_size: int | None) -> int:
    if vocab_size is None:
        return local_vocab
    return max(0, min(local_vocab, vocab_size - vocab_start))


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, vocab_size, group, inplace_backward):
        x = as_rows(logits)  # [N, V_local]
        n_rows, local_vocab = x.shape
        flat_labels = labels.reshape(-1).contiguous()  # reshape may keep a strided view
        if flat_labels.numel() != n_rows:
            raise ValueError(f"{flat_labels.numel()} labels for {n_rows} rows of logits")
        n_valid = _n_valid(local_vocab, vocab_start, vocab_size)
        row_max = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        sums = torch.empty((2, n_rows), dtype=torch.float32, device=x.device)  # [sum-exp; target]
        if n_rows:
            block = min(BLOCK_FWD, triton.next_power_of_2(max(n_valid, 1)))
            _ce_fwd[(n_rows,)](
                x,
                flat_labels,
                row_max,
                sums,
                x.stride(0),
                n_rows,
                n_valid,
                vocab_start,
                BLOCK=block,
                num_warps=8 if block >= 2048 else 4,
            )
        if group_size(group) > 1:
            global_max = all_reduce(row_max.clone(), group, op=dist.ReduceOp.MAX)
            sums[0].mul_(torch.exp(row_max - global_max))  # a padding-only rank: exp(-inf) * 0 = 0
            all_reduce(sums, group)
            row_max = global_max
        lse = sums[0].log_().add_(row_max)
        valid = flat_labels != IGNORE_INDEX
        ctx.save_for_backward(x, flat_labels, lse, valid)
        ctx.n_valid, ctx.vocab_start, ctx.inplace = n_valid, vocab_start, inplace_backward
        ctx.used = False
        ctx.logits_shape = logits.shape
        return torch.where(valid, lse - sums[1], 0.0).view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.inplace and ctx.used:
            raise RuntimeError(
                "cross_entropy(inplace_backward=True) runs backward once (its first backward "
                "overwrote the logits); pass inplace_backward=False for retain_graph"
            )
        ctx.used = True
        x, labels, lse, valid = ctx.saved_tensors
        n_rows, local_vocab = x.shape
        scale = torch.where(valid, grad_loss.reshape(-1).float(), 0.0).contiguous()
        grad = x if ctx.inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if n_rows and local_vocab:
            block = min(BLOCK_BWD, triton.next_power_of_2(local_vocab))
            _ce_bwd[(n_rows, triton.cdiv(local_vocab, block))](
                x,
                grad,
                labels,
                lse,
                scale,
                x.stride(0),
                grad.stride(0),
                local_vocab,
                ctx.n_valid,
                ctx.vocab_start,
                BLOCK=block,
                num_warps=8 if block >= 2048 else 4,
            )
        return grad.view(ctx.logits_shape), None, None, None, None, None


def cross_entropy(logits, labels, *, vocab_start=0, vocab_size=None, group=None, inplace_backward=False):
    """See kernels.cross_entropy."""
    return _CrossEntropy.apply(logits, labels, vocab_start, vocab_size, group, inplace_backward)
