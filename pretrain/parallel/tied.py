"""The two copies of a tied embedding under pipeline parallelism, and the sum of their gradients.

A pipelined tied model (gpt2) holds the token embedding twice: the first stage's chunk uses it
as the input embedding, the last stage's chunk as the output layer (pretrain/models/gpt.py marks
both `tied_embedding`, the last stage's also `tied_output_copy`). Both start equal (the same
initialisation, or the same checkpoint tensor) and are kept equal by giving both the sum of
their gradients after the step's backward passes: the optimizer then updates two equal tensors
with equal gradients, identically.

Under 1F1B and interleaved schedules the copies are on the first and the last pipeline rank and
are summed by an all-reduce over `topo.embedding_group`. Under zb-v both stages are on pipeline
rank 0, as two chunks: the sum is an addition within the rank.

Why two Parameters summed within the rank, not one Parameter shared by the two chunks: the sum
is exact (one fp add of the two contributions, where a shared Parameter's AccumulateGrad would
add them micro-batch by micro-batch: the same sum up to the order of additions; copied to both,
so the copies stay bit-for-bit equal, which tests/test_zero_bubble checks), and everything else
stays per chunk, as it is for every other parameter. A shared Parameter would receive its two contributions at different
times (the output layer's in chunk 1's backward and W passes, the embedding's in chunk 0's),
while gradient buckets and ZeRO's hand-on fire once per parameter, in its chunk's last
backward; it would also belong to two chunks' parameter lists (buckets, ZeRO's flat groups,
checkpoint names), each of which would need an exception. The copies' sum reuses the path
1F1B's tied copies already take: held out of ZeRO-1's buckets until the end, then summed.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.models.sharding import sharding
from pretrain.parallel.comm import all_reduce_flat
from pretrain.parallel.topology import Topology


def tied_copies(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters among `params` that are a pipeline copy of the tied embedding, in the order
    given (chunk order: the first stage's copy before the last stage's when a rank has both)."""
    return [p for p in params if sharding(p).tied_embedding]


def sum_tied_gradients(grads: list[torch.Tensor], topo: Topology) -> None:
    """Give every copy of the tied embedding, in place, the sum of both copies' gradients.

    `grads`: this rank's copies' gradients (its TP shard of each). Two: both copies are here
    (zb-v's rank 0), added within the rank; one: the other copy is on the other end of the
    pipeline, summed over the embedding group; none: a middle stage, nothing to do."""
    if len(grads) == 2:
        first, last = grads
        first.add_(last)
        last.copy_(first)
    else:
        assert len(grads) <= 1, f"{len(grads)} tied embedding copies on one rank"
        all_reduce_flat(grads, topo.embedding_group)
