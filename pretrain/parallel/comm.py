"""Autograd-aware collectives for tensor and sequence parallelism (Megatron's conjugate pairs).

Each operator's backward is the conjugate of its forward, so a tensor-parallel region costs
exactly one all-reduce forward and one backward:

  copy_to_tp        forward identity,          backward all-reduce      (enter a TP region)
  reduce_from_tp    forward all-reduce,        backward identity        (leave a TP region)
  gather_sequence   forward all-gather (seq),  backward reduce-scatter  (enter, sequence parallel)
  scatter_sequence  forward reduce-scatter,    backward all-gather      (leave, sequence parallel)
  split_sequence    forward take own chunk,    backward all-gather

The sequence dimension is dim 1 of [batch, seq, hidden] activations. With a group of size one
(or None) every operator is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.parallel.waits import waiting

Group = dist.ProcessGroup | None


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        with waiting():
            dist.all_reduce(x, op=op, group=group)
    return x


def all_reduce_flat(tensors: list[torch.Tensor], group: Group) -> None:
    """Sum the tensors over the group in place, with one all-reduce of their concatenation: one
    call per set instead of one per tensor (gradients of norms, biases, tied embeddings)."""
    if not tensors or group_size(group) == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    all_reduce(flat, group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _all_gather_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    with waiting():
        dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _reduce_scatter_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    size = group_size(group)
    if x.shape[1] % size:
        raise ValueError(f"sequence length {x.shape[1]} is not divisible by the tensor-parallel size {size}")
    parts = [p.contiguous() for p in x.chunk(size, dim=1)]
    out = torch.empty_like(parts[0])
    with waiting():
        dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


class _SplitSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.chunk(group_size(group), dim=1)[group_rank(group)].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherSequence.apply(x, group)


def scatter_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ScatterSequence.apply(x, group)


def split_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _SplitSequence.apply(x, group)
