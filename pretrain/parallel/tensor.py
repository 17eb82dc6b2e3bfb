"""Megatron-style tensor parallelism: column/row-parallel linears, a vocabulary-parallel
embedding and cross-entropy, and the layer factory that swaps them into the GPT.

Every sharded parameter is marked with its ShardSpec (pretrain/models/sharding.py): which
dimension is split and into how many stacked parts, so that initialisation, checkpoint
merging and resharding all slice full tensors the same way. A parameter without one is
replicated on every TP rank.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.models import kernels
from pretrain.models.layers import make_norm
from pretrain.models.sharding import ShardSpec, mark
from pretrain.parallel.comm import (
    copy_to_tp,
    gather_sequence,
    reduce_from_tp,
    scatter_sequence,
    split_sequence,
)
from pretrain.parallel.context import ContextParallel
from pretrain.parallel.random import tensor_parallel_rng
from pretrain.parallel.topology import Topology
from pretrain.parallel.waits import waiting


def _param(shape: tuple[int, ...], spec: ShardSpec | None = None, *, sequence_parallel: bool = False) -> nn.Parameter:
    return mark(nn.Parameter(torch.empty(shape)), tp=spec, sequence_parallel=sequence_parallel)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split across TP ranks; y stays split (no comm).
    `weight_grads`: a zero-bubble schedule's store (pretrain/models/weight_grads.py), which then
    gets dW and db. Under sequence parallelism their W keeps the all-gathered input (as the
    plain backward keeps it until B) instead of gathering it again: no communication in W."""

    weight_grads = None

    def __init__(self, in_features: int, out_features: int, *, bias: bool, stacked: int, topo: Topology) -> None:
        super().__init__()
        if out_features % (topo.tp * stacked):
            raise ValueError(
                f"{out_features} output features cannot be split into {stacked} parts x {topo.tp} tensor-parallel ranks"
            )
        self.group, self.sequence_parallel = topo.tp_group, topo.sequence_parallel
        spec = ShardSpec(dim=0, parts=stacked)
        self.weight = _param((out_features // topo.tp, in_features), spec)
        self.bias = _param((out_features // topo.tp,), spec) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [b, s(/tp under SP), in] -> [b, s, out/tp]
        x = gather_sequence(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        if self.weight_grads is not None:
            return self.weight_grads.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split; partial products are summed across TP.
    `weight_grads`: as ColumnParallelLinear's (dW from this rank's input shard, db after the
    reduction)."""

    weight_grads = None

    def __init__(self, in_features: int, out_features: int, *, bias: bool, topo: Topology) -> None:
        super().__init__()
        if in_features % topo.tp:
            raise ValueError(f"{in_features} input features cannot be split across {topo.tp} ranks")
        self.group, self.sequence_parallel = topo.tp_group, topo.sequence_parallel
        self.weight = _param((out_features, in_features // topo.tp), ShardSpec(dim=1))
        self.bias = _param((out_features,), sequence_parallel=topo.sequence_parallel) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [b, s, in/tp] -> [b, s(/tp under SP), out]
        split = self.weight_grads
        y = F.linear(x, self.weight) if split is None else split.linear(x, self.weight, None)
        y = scatter_sequence(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        if self.bias is None:
            return y
        return y + self.bias if split is None else split.bias_add(y, self.bias)


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary rows split; each rank looks up the ids it owns.
    `weight_grads`: as ColumnParallelLinear's."""

    weight_grads = None

    def __init__(self, rows: int, dim: int, *, topo: Topology) -> None:
        super().__init__()
        if rows % topo.tp:
            raise ValueError(f"{rows} vocabulary rows cannot be split across {topo.tp} ranks")
        self.group = topo.tp_group
        self.local_rows = rows // topo.tp
        self.start = topo.tp_rank * self.local_rows
        self.weight = _param((self.local_rows, dim), ShardSpec(dim=0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.local_rows)
        ids = local.masked_fill(outside, 0)
        split = self.weight_grads
        out = F.embedding(ids, self.weight) if split is None else split.embedding(ids, self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)  # [b, s, h], full on every rank


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, topo: Topology, vocab_size: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy over labels != -100 of vocab-split logits [b, s, V/tp], never gathering
    them (kernels.cross_entropy over the TP group: only [tokens]-sized tensors cross ranks).
    Columns at or past `vocab_size` (padding) are left out of the softmax; a rank holding only
    padding is fine. With Triton the gradient is written over the logits (only this loss uses
    them)."""
    return kernels.cross_entropy(
        logits,
        labels,
        vocab_start=topo.tp_rank * logits.shape[-1],
        vocab_size=vocab_size,
        group=topo.tp_group,
        inplace_backward=True,
        reduction="mean",
    )


class _GatherVocab(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank = group, dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        with waiting():
            dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(dist.get_world_size(ctx.group), dim=-1)[ctx.rank].contiguous(), None


class TensorParallelLayers:
    """The layer factory for tensor parallelism (see pretrain/models/layers.py for the contract)."""

    weight_grads = None  # a zero-bubble schedule's store: the output layer's dW goes there

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.tp_size = topo.tp
        self.tp_rank = topo.tp_rank
        self.group = topo.tp_group
        self.sequence_parallel = topo.sequence_parallel
        self.context = ContextParallel.of(topo)  # None without context parallelism

    def column(self, in_features: int, out_features: int, *, bias: bool, stacked: int = 1) -> nn.Module:
        return ColumnParallelLinear(in_features, out_features, bias=bias, stacked=stacked, topo=self.topo)

    def row(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        return RowParallelLinear(in_features, out_features, bias=bias, topo=self.topo)

    def embedding(self, rows: int, dim: int) -> nn.Module:
        return VocabParallelEmbedding(rows, dim, topo=self.topo)

    def norm(self, config) -> nn.Module:
        norm = make_norm(config)
        if self.sequence_parallel:
            for p in norm.parameters():
                mark(p, sequence_parallel=True)
        return norm

    def enter_sequence_parallel(self, x: torch.Tensor) -> torch.Tensor:
        """After the embedding: keep only this rank's sequence chunk under sequence parallelism."""
        return split_sequence(x, self.group) if self.sequence_parallel else x

    def output_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # hidden [b, s(/tp), h] -> logits [b, s, V/tp]; the vocabulary stays split.
        x = gather_sequence(hidden, self.group) if self.sequence_parallel else copy_to_tp(hidden, self.group)
        return F.linear(x, weight) if self.weight_grads is None else self.weight_grads.linear(x, weight, None)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.tp_size == 1 else _GatherVocab.apply(logits, self.group)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, topo=self.topo, vocab_size=vocab_size)

    def rng_region(self):
        """Dropout inside a TP region (attention probabilities of this rank's heads) draws from a
        stream that differs per TP rank."""
        return tensor_parallel_rng(self.topo.tp_rank) if self.tp_size > 1 else contextlib.nullcontext()
