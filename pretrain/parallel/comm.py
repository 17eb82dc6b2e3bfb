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


def _own_chunk(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x.chunk(group_size(group), dim=1)[group_rank(group)].contiguous()


class _Conjugate(torch.autograd.Function):
    """`forward(x, group)` forward and `backward(grad, group)` backward: one of the pairs above."""

    @staticmethod
    def forward(ctx, x, group, forward, backward):
        ctx.group, ctx.backward_fn = group, backward
        return forward(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad, ctx.group), None, None, None


def _conjugate(x: torch.Tensor, group: Group, forward, backward) -> torch.Tensor:
    return x if group_size(group) == 1 else _Conjugate.apply(x, group, forward, backward)


def _identity(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x


def _all_reduce_copy(x: torch.Tensor, group: Group) -> torch.Tensor:
    return all_reduce(x.clone(), group)  # the forward's input is not ours to overwrite


def _all_reduce_grad(grad: torch.Tensor, group: Group) -> torch.Tensor:
    return all_reduce(grad.contiguous(), group)


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _conjugate(x, group, _identity, _all_reduce_grad)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _conjugate(x, group, _all_reduce_copy, _identity)


def gather_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _conjugate(x, group, _all_gather_seq, _reduce_scatter_seq)


def scatter_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _conjugate(x, group, _reduce_scatter_seq, _all_gather_seq)


def split_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _conjugate(x, group, _own_chunk, _all_gather_seq)
