"""The single-device output layer fused with its cross-entropy, and the scratch buffer it reuses.

`LinearCrossEntropy` (what `kernels.linear_cross_entropy(hidden, weight, labels)` runs without
Triton) is `F.cross_entropy(F.linear(hidden, weight).float(), labels)` over the first `vocab_size`
rows of `weight`, computed with one [tokens, vocab] fp32 buffer instead of four: at GPT
vocabularies those buffers (logits, log-softmax output, NLL-backward zeros, log-softmax-backward
output) and the passes over them cost more than everything but the matmuls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class ScratchBuffer:
    """One large scratch tensor kept from one step to the next, on CPU.

    CUDA's caching allocator hands the same memory back every step. On CPU, glibc serves blocks
    above 32 MB with a fresh mmap and unmaps them when freed, so every step page-faults the whole
    buffer in again: 32 ms per step for the 262 MB logits of 2048 tokens x 32000 (measured against
    a 0.34 s matmul into it). Kept here, the memory is faulted in once. A buffer that an earlier
    forward still holds (micro-batches in flight, a graph kept alive) is never handed out twice:
    the caller then gets a fresh tensor.
    """

    def __init__(self) -> None:
        self._tensor: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of `shape` (the kept one when it is free and big enough)."""
        if device.type != "cpu" or not _CAN_COUNT_USERS:
            return torch.empty(shape, dtype=dtype, device=device)
        kept, n = self._tensor, math.prod(shape)
        if kept is not None and _storage_users(kept) > 1:  # still saved by an earlier forward
            return torch.empty(shape, dtype=dtype, device=device)
        if kept is None or kept.dtype != dtype or kept.numel() < n:
            self._tensor = None  # free the old one before allocating its successor
            kept = self._tensor = torch.empty(n, dtype=dtype, device=device)
        return kept[:n].view(shape)


# torch's own liveness check for storages (torch/_inductor/cudagraph_trees.py uses it). Without it
# nothing is reused, which is only slower.
_CAN_COUNT_USERS = hasattr(torch._C, "_storage_Use_Count")


def _storage_users(t: torch.Tensor) -> int:
    # The count includes the temporary storage object made for asking.
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight[:vocab_size].T` over labels != ignore_index.

    Forward: logits into the buffer, one read pass for each row's max, then softmax written over
    the logits in place (row by row, in cache). The loss needs log-sum-exp: a row's largest
    probability is exactly 1 / sum(exp(logit - max)) and never below 1 / vocab, so
    lse = max - log(max probability), one more read pass (two reads are cheaper than torch's max
    with indices) and no underflow however far the target is from the max.
    Backward: the gradient is per_row * (softmax - onehot); the softmax - onehot is formed in the
    buffer (one scatter) and the per-row factor is applied to the [tokens, hidden] operands of the
    two matmuls instead of the [tokens, vocab] buffer.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, vocab_size, scratch, deferred=None, anchor=None):
        # hidden [N, h], weight [V padded, h], labels [N]; only the first vocab_size rows count.
        # deferred: (WeightGradStore, the weight parameter) when a zero-bubble schedule runs the
        # weight's gradient later (pretrain/models/weight_grads.py; `weight` is then detached and
        # `anchor` keeps the loss in the graph).
        ctx.deferred = deferred
        device = hidden.device
        ctx.dtypes, ctx.rows = (hidden.dtype, weight.dtype), weight.shape[0]
        ctx.autocast_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        weight = weight[:vocab_size]  # a view: padding rows are neither multiplied nor differentiated
        if ctx.autocast_dtype is not None:  # what autocast does to F.linear, done by hand
            hidden, weight = hidden.to(ctx.autocast_dtype), weight.to(ctx.autocast_dtype)
        n = hidden.shape[0]
        # fp32, or the input's own dtype when wider (float64 exactness tests)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        logits = (
            scratch.take((n, vocab_size), acc, device)
            if scratch
            else torch.empty((n, vocab_size), dtype=acc, device=device)
        )
        if hidden.dtype == acc:
            torch.mm(hidden, weight.t(), out=logits)
        else:
            logits.copy_(F.linear(hidden, weight))
        valid = labels != ignore_index
        target = labels.masked_fill(~valid, 0)
        target_logit = logits.gather(1, target[:, None]).squeeze(1)
        row_max = logits.amax(dim=1)
        if logits.is_cpu:  # the CPU kernel goes row by row, reading each element before writing it
            probs = torch.softmax(logits, dim=1, out=logits)  # logits is overwritten from here on
        else:  # not tried in place on GPUs, which normally take the Triton loss (layers.py) anyway
            probs = torch.softmax(logits, dim=1)
        lse = row_max - probs.amax(dim=1).log()
        # clamp: labels all ignored give 0, not 0/0, as kernels.cross_entropy's mean (a context-
        # parallel rank's share of a masked-LM sequence can hold no masked token).
        count = valid.sum().clamp(min=1)
        loss = ((lse - target_logit) * valid).sum() / count
        ctx.save_for_backward(hidden, weight, probs, target, valid, count)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError(
                "the fused linear cross-entropy backward runs once (its saved buffer "
                "becomes the gradient); for retain_graph use "
                "layers.cross_entropy(layers.output_logits(...), labels, vocab_size=...)"
            )
        ctx.used = True
        hidden, weight, probs, target, valid, count = ctx.saved_tensors
        per_row = (grad_loss / count * valid)[:, None]  # [N, 1]; 0 on ignored rows
        grad = probs
        grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1.0  # softmax - onehot
        if ctx.autocast_dtype is not None:
            grad = grad.to(ctx.autocast_dtype)
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = ((grad @ weight) * per_row.to(grad.dtype)).to(ctx.dtypes[0])
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_grad(grad, hidden, per_row, rows=ctx.rows, dtype=ctx.dtypes[1])
        elif ctx.deferred is not None:  # the [tokens, vocab] gradient lives on until the W
            store, param = ctx.deferred
            rows, dtype, hidden = ctx.rows, ctx.dtypes[1], hidden.detach()
            store.defer((param,), lambda: [(param, _weight_grad(grad, hidden, per_row, rows=rows, dtype=dtype))])
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _weight_grad(grad, hidden, per_row, *, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """d loss / d weight [rows, h] from (softmax - onehot) [N, vocab], hidden [N, h] and the
    per-row factor [N, 1]. Straight into a buffer of the padded shape (padding rows zero):
    slicing the weight outside would cost a zero-filled [V padded, h] buffer and a copy into it."""
    vocab = grad.shape[1]
    scaled = hidden * per_row.to(hidden.dtype)
    grad_weight = torch.empty((rows, hidden.shape[1]), dtype=dtype, device=hidden.device)
    if grad.dtype == grad_weight.dtype:
        torch.mm(grad.t(), scaled, out=grad_weight[:vocab])
    else:
        grad_weight[:vocab] = grad.t() @ scaled
    grad_weight[vocab:].zero_()
    return grad_weight
