"""PyTorch reference versions of the fused kernels: the same functions, written plainly.

They run everywhere (CPU tests, any GPU without Triton) and are what the Triton versions are
checked against. Each computes in fp32 and returns the input's dtype, like the kernels, so that
swapping one for the other changes results only by rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.models.loss import IGNORE_INDEX
from pretrain.parallel.comm import all_reduce


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None = None) -> torch.Tensor:
    """F.rms_norm over the last dim, computed in fp32; eps=None means finfo(x.dtype).eps."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """F.layer_norm over the last dim, computed in fp32."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h [..., 2f] = [gate; up] -> silu(gate) * up [..., f]."""
    gate, up = h.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(h.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (as gpt.apply_rope): x [b, heads, s, d], cos/sin [>= s, d]."""
    s = x.shape[-2]
    cos, sin = cos[:s].float(), sin[:s].float()
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def apply_rope_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place RoPE on q and k (see kernels.apply_rope_ for the autograd rules)."""
    return _RopeInPlace.apply(q, cos, sin), _RopeInPlace.apply(k, cos, sin)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return rope(q, cos, sin), rope(k, cos, sin)


def rope_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transpose of `rope` applied to a gradient (the inverse rotation when the two halves
    of the tables are equal, as rope_tables makes them)."""
    s, half = grad.shape[-2], grad.shape[-1] // 2
    c1, c2 = cos[:s, :half].float(), cos[:s, half:].float()
    s1, s2 = sin[:s, :half].float(), sin[:s, half:].float()
    g1, g2 = grad.float().chunk(2, dim=-1)
    return torch.cat([g1 * c1 + g2 * s2, g2 * c2 - g1 * s1], dim=-1).to(grad.dtype)


class _RopeInPlace(torch.autograd.Function):
    # One tensor per Function: autograd lets a Function that modifies a view in place return
    # only that one tensor.
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        with torch.no_grad():
            x.copy_(rope(x, cos, sin))
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rope_backward(grad, cos, sin), None, None


def padding_mask(
    local_vocab: int, *, vocab_start: int, vocab_size: int | None, device: torch.device
) -> torch.Tensor | None:
    """[V_local] bool, True on the columns that are real vocabulary (None when all are)."""
    if vocab_size is None or vocab_start + local_vocab <= vocab_size:
        return None
    return torch.arange(vocab_start, vocab_start + local_vocab, device=device) < vocab_size


class _CrossEntropy(torch.autograd.Function):
    """Per-token (vocab-parallel) cross-entropy, materialising fp32 logits; saves the input
    logits and the log-sum-exp [N] and recomputes the softmax in backward."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, vocab_size, group):
        # logits [N, V_local], labels [N]
        x = logits.float()
        keep = padding_mask(x.shape[1], vocab_start=vocab_start, vocab_size=vocab_size, device=x.device)
        if keep is not None:
            x = x.masked_fill(~keep, float("-inf"))
        row_max = x.amax(dim=1)  # -inf on a rank holding only padding
        all_reduce(row_max, group, op=torch.distributed.ReduceOp.MAX)
        local, mine = _local_targets(labels, vocab_start, x.shape[1], vocab_size)
        target = x.gather(1, local[:, None]).squeeze(1).masked_fill(~mine, 0.0)
        sums = torch.stack([(x - row_max[:, None]).exp().sum(dim=1), target])  # [2, N]
        all_reduce(sums, group)
        lse = sums[0].log() + row_max
        valid = labels != IGNORE_INDEX
        ctx.save_for_backward(logits, labels, lse)
        ctx.vocab_start, ctx.vocab_size = vocab_start, vocab_size
        return torch.where(valid, lse - sums[1], 0.0)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, lse = ctx.saved_tensors
        x = logits.float()
        grad = (x - lse[:, None]).exp()
        keep = padding_mask(x.shape[1], vocab_start=ctx.vocab_start, vocab_size=ctx.vocab_size, device=x.device)
        if keep is not None:
            grad = grad.masked_fill(~keep, 0.0)
        local, mine = _local_targets(labels, ctx.vocab_start, x.shape[1], ctx.vocab_size)
        rows = torch.arange(x.shape[0], device=x.device)
        grad[rows, local] -= mine.float()
        scale = torch.where(labels != IGNORE_INDEX, grad_loss.float(), 0.0)
        return (grad * scale[:, None]).to(logits.dtype), None, None, None, None


def _local_targets(
    labels: torch.Tensor, vocab_start: int, local_vocab: int, vocab_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(local column of each label, clamped to 0 where not this rank's; whether it is)."""
    local = labels - vocab_start
    mine = (local >= 0) & (local < local_vocab)
    if vocab_size is not None:
        mine &= labels < vocab_size
    return local.masked_fill(~mine, 0), mine


def cross_entropy(logits, labels, *, vocab_start=0, vocab_size=None, group=None, inplace_backward=False):
    """Per-token loss [*labels.shape] fp32 of logits [..., V_local] (see kernels.cross_entropy);
    `inplace_backward` is accepted for the same signature and has no effect here."""
    flat = logits.reshape(-1, logits.shape[-1])
    return _CrossEntropy.apply(flat, labels.reshape(-1), vocab_start, vocab_size, group).view(labels.shape)
