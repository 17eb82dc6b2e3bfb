"""What the rest of the framework must know about a parameter, beyond its values.

Gradient reduction, the gradient norm, checkpoints, initialisation and DeepSpeed each need to
know whether a parameter is a tensor-parallel shard, whether its gradient is a partial sum
under sequence parallelism, and whether it is the pipeline's second copy of a tied embedding.
The layers that create a parameter say so once with `mark(param, ...)`; everyone else reads
`sharding(param)`, one typed value, instead of probing ad-hoc attributes. New parallel
dimensions add a field here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter is split across tensor-parallel ranks: along `dim`, each of `parts`
    stacked blocks (SwiGLU's [gate; up] has 2) split separately so every rank holds a slice of
    each."""

    dim: int
    parts: int = 1


@dataclass(frozen=True)
class Sharding:
    tp: ShardSpec | None = None
    """The tensor-parallel split; None: the same tensor on every TP rank."""
    sequence_parallel: bool = False
    """Replicated, but applied to a sequence shard: its gradient is partial on each TP rank and
    must be summed over them."""
    tied_embedding: bool = False
    """One of the two pipeline copies of a tied embedding (first and last stage): their
    gradients are summed (pretrain/parallel/tied.py) and the norm counts the first stage's only."""
    tied_output_copy: bool = False
    """The last stage's copy of a tied embedding (the output layer's): left out of the gradient
    norm, and not saved by a rank that also holds the first stage's copy (zb-v's rank 0). Marked
    on the copy, not inferred from the pipeline rank, because under zb-v both copies are on rank 0."""
    expert: bool = False
    """A routed expert's weight of a MoE layer (pretrain/models/moe.py), under its global expert
    index in the parameter name. With expert parallelism each EP rank holds other experts: its
    gradient is averaged over the ranks holding the same experts, and the norm sums it over the
    EP group."""


REPLICATED = Sharding()


def sharding(param: torch.Tensor) -> Sharding:
    """The sharding facts of a parameter (REPLICATED when nothing was marked)."""
    return getattr(param, "sharding", REPLICATED)


def mark(param: torch.Tensor, **facts) -> torch.Tensor:
    """Record facts about `param` (fields of Sharding), keeping those already recorded."""
    param.sharding = dataclasses.replace(sharding(param), **facts)
    return param


def shard_tensor(full: torch.Tensor, spec: ShardSpec, *, rank: int, size: int) -> torch.Tensor:
    """This rank's slice of a full tensor."""
    blocks = full.chunk(spec.parts, dim=spec.dim)
    return torch.cat([b.chunk(size, dim=spec.dim)[rank] for b in blocks], dim=spec.dim)


def unshard_tensors(shards: list[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """The full tensor from every rank's slice, in rank order (inverse of shard_tensor)."""
    per_rank = [s.chunk(spec.parts, dim=spec.dim) for s in shards]
    return torch.cat([torch.cat([p[i] for p in per_rank], dim=spec.dim) for i in range(spec.parts)], dim=spec.dim)


def full_shape(param: torch.Tensor, tp_size: int, shape: torch.Size | list[int] | None = None) -> torch.Size:
    """The unsharded shape of a (possibly TP-sharded) parameter whose shard has `shape`
    (default: the parameter's own)."""
    spec = sharding(param).tp
    shape = list(param.shape if shape is None else shape)
    if spec is not None:
        shape[spec.dim] *= tp_size
    return torch.Size(shape)
