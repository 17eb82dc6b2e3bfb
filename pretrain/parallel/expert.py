"""Expert parallelism (parallel.expert): each rank of an EP group holds num_experts / ep of a MoE
layer's experts, and the token-expert rows travel to the rank holding their expert and back by
all-to-all with variable counts.

One exchange per MoE layer and direction, the same on every rank of the EP group whatever the
routing: first the counts (a fixed-size all-to-all, [E] per rank), then the rows with the split
sizes those counts give. A rank may send or receive zero rows (all its tokens routed elsewhere, or
nobody's to it): the all-to-all still runs, with empty splits, so every rank issues the same
collectives in the same order (NCCL's rule) and the backward mirrors the forward.

The backward of the rows' exchange is the reverse all-to-all (the output splits become the input
splits): exact, no reduction involved. The counts carry no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.parallel.topology import Topology
from pretrain.parallel.waits import waiting


def _all_to_all(x: torch.Tensor, *, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """rows [sum(in_splits), h] -> [sum(out_splits), h]: in_splits[r] rows to rank r of the group,
    out_splits[r] rows from it."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    with waiting():
        dist.all_to_all_single(
            out, x.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits, group=group
        )
    return out


class _AllToAll(torch.autograd.Function):
    """The rows' exchange; its gradient goes back by the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits=out_splits, in_splits=in_splits, group=group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, out_splits=in_splits, in_splits=out_splits, group=ctx.group), None, None, None


@dataclass
class Exchange:
    """What `ExpertParallel.dispatch` did, for `combine` to undo: the permutation from the
    received order (by source rank, then local expert) to the experts' order, and the splits."""

    order: torch.Tensor
    sent: list[int]
    received: list[int]


class ExpertParallel:
    """The EP group of one rank and which experts it holds."""

    def __init__(self, topo: Topology) -> None:
        self.size, self.rank, self.group = topo.ep, topo.ep_rank, topo.ep_group

    @staticmethod
    def of(topo: Topology) -> ExpertParallel | None:
        """None without expert parallelism: the MoE layer then holds and runs every expert."""
        return ExpertParallel(topo) if topo.ep > 1 else None

    def local_experts(self, num_experts: int) -> range:
        """The global indices of this rank's experts (a contiguous block, as Megatron places them)."""
        per_rank = num_experts // self.size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def dispatch(self, rows: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Exchange]:
        """rows [N, h] sorted by global expert, counts [E] rows per expert -> this rank's experts'
        rows [M, h] sorted by local expert, their counts [E/ep], and the Exchange for combine."""
        per_rank = counts.numel() // self.size
        send = counts.reshape(self.size, per_rank)  # [ep, E/ep]: row r goes to EP rank r
        recv = torch.empty_like(send)  # [ep, E/ep]: from source rank s, rows per local expert
        with waiting():
            dist.all_to_all_single(recv, send.contiguous(), group=self.group)
        sent, received = send.sum(1).tolist(), recv.sum(1).tolist()
        arrived = _AllToAll.apply(rows, received, sent, self.group)  # [M, h] by source, then expert
        local_expert = torch.arange(per_rank, device=rows.device).repeat(self.size)
        order = torch.argsort(torch.repeat_interleave(local_expert, recv.reshape(-1)), stable=True)
        return arrived[order], recv.sum(0), Exchange(order=order, sent=sent, received=received)

    def combine(self, out: torch.Tensor, exchange: Exchange) -> torch.Tensor:
        """The experts' outputs [M, h] in this rank's expert order -> [N, h] back on the ranks and
        in the order the rows came from (dispatch's inverse)."""
        back = torch.empty_like(exchange.order)
        back[exchange.order] = torch.arange(exchange.order.numel(), device=back.device)
        return _AllToAll.apply(out[back], exchange.sent, exchange.received, self.group)
