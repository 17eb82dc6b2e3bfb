"""Context parallelism: each sequence split over the CP ranks, and attention across them.

Layout. A sequence of s tokens is cut into 2 x CP chunks of c = s / (2 CP) tokens; CP rank i
holds chunks i and 2 CP - 1 - i, in that order (its s / CP local tokens). Under the causal mask
a query sees more keys the later it sits, so rank i's early chunk and late chunk together cost
every rank the same attention work (torchtitan's head-tail balancing, Megatron's too).

Every CP rank of a data-parallel position reads the same full micro-batch (the loader knows
nothing of CP); the model keeps this rank's tokens (`local`) as it embeds them and its labels
as it takes the loss, and places each local token at its global position (`positions`: the
learned position embedding and the RoPE tables are indexed by it). The full `segments` (document
numbers) are known on every CP rank, so the masks across documents need no communication.

Loss. A rank computes the mean loss over its local labels, then `loss_share` scales it by
CP x (its label count) / (the sequence's label count): the mean of the CP ranks' values is the
mean over the whole micro-batch, and gradients average over data x context ranks exactly as
over data-parallel replicas (pretrain/parallel/data.py, and DeepSpeed under ZeRO). With no
ignored labels the factor is exactly 1. The counts come from the full labels every rank has.

Attention (parallel.context_attention):
- `all_gather`: K/V of all CP ranks gathered (one all-gather of the stacked K and V, whose
  backward reduce-scatters their gradients), then this rank's queries attend to them with a
  mask built from the global positions (causal) and the documents: any attention kernel that
  takes a mask works, and grouped-query attention keeps the gathered K/V small.
- `ring`: pretrain/parallel/ring_attention.py; each K/V block through a fused kernel that returns
  its log-sum-exp (pretrain/parallel/ring_kernels.py: torch's flash kernel on CPU, torch's or
  flash-attn's on CUDA, following model.attention_backend).

Without context parallelism the layer factory's `context` is None and none of this runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pretrain.models.attention import Documents, attention
from pretrain.models.loss import IGNORE_INDEX
from pretrain.parallel.ring_attention import RingBlock, RingLink, ring_attention, visible
from pretrain.parallel.ring_kernels import choose_kernel
from pretrain.parallel.topology import Topology
from pretrain.parallel.waits import waiting


@dataclass(frozen=True)
class LocalSequence:
    """What attention needs to know about this rank's share of a micro-batch, derived once per
    forward (`ContextParallel.prepare`) and passed to every layer in place of `Documents`."""

    positions: torch.Tensor  # [cp, s / cp] global positions of every CP rank's tokens
    mask: torch.Tensor | None = None  # all_gather: bool [b | 1, 1, s / cp, s], local queries x gathered keys
    blocks: tuple[RingBlock | None, ...] = ()  # ring: per source CP rank, what its K/V block contributes
    _additive: dict = field(default_factory=dict, repr=False)

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """`mask` as SDPA's additive float mask (0 / -inf) in `dtype`, made once per forward.
        Handed a boolean mask, SDPA converts it to a float one of the scores' size on every call
        and saves that copy for its backward: per layer 4x the boolean's bytes (measured: +218
        MiB over 8 layers at 4096 tokens, CP 2). One float mask is saved by every layer, once."""
        if self.mask is None:
            return None
        if dtype not in self._additive:
            zeros = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            self._additive[dtype] = zeros.masked_fill_(~self.mask, float("-inf"))
        return self._additive[dtype]


class ContextParallel:
    """This rank's place in its CP group, and the operations the model asks of it (see the module
    doc). Built by the layer factory from the Topology when parallel.context > 1."""

    def __init__(self, topo: Topology, *, block_kernel: str = "auto") -> None:
        self.size, self.rank, self.group = topo.cp, topo.cp_rank, topo.cp_group
        self.method = topo.context_attention
        self.block_kernel = block_kernel  # the ring's (pretrain/parallel/ring_kernels.py); tests pick one
        self._kernels: dict = {}
        self.link = RingLink(group=topo.cp_group, next_rank=topo.cp_peer(1), prev_rank=topo.cp_peer(-1))

    @staticmethod
    def of(topo: Topology) -> ContextParallel | None:
        return ContextParallel(topo) if topo.cp > 1 else None

    # -- the split ------------------------------------------------------------------------------

    def chunk_ids(self, rank: int) -> tuple[int, int]:
        """The two chunks (of 2 x CP) CP rank `rank` holds, in its local order."""
        return rank, 2 * self.size - 1 - rank

    def positions(self, seq_len: int, *, device: torch.device, rank: int | None = None) -> torch.Tensor:
        """Global positions [seq_len / cp] of the tokens CP rank `rank` (default: this one) holds."""
        c = seq_len // (2 * self.size)
        first, second = self.chunk_ids(self.rank if rank is None else rank)
        return torch.cat([torch.arange(first * c, (first + 1) * c), torch.arange(second * c, (second + 1) * c)]).to(
            device
        )

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of a full-sequence tensor [b, s, ...] -> [b, s / cp, ...]."""
        if x.shape[1] % (2 * self.size):
            raise ValueError(
                f"a sequence of {x.shape[1]} tokens cannot be split into 2 x parallel.context = "
                f"{2 * self.size} equal chunks; model.seq_length must be a multiple of {2 * self.size}"
            )
        pieces = x.chunk(2 * self.size, dim=1)
        first, second = self.chunk_ids(self.rank)
        return torch.cat([pieces[first], pieces[second]], dim=1)

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """Every CP rank's tokens [b, s / cp, ...] -> the whole sequence's [b, s, ...] in order
        (`local`'s inverse; an all-gather without gradient: the MoE capacity's token order)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        with waiting():
            dist.all_gather(parts, x.contiguous(), group=self.group)
        out = x.new_empty((x.shape[0], x.shape[1] * self.size, *x.shape[2:]))
        for rank, part in enumerate(parts):
            out[:, self.positions(out.shape[1], device=x.device, rank=rank)] = part
        return out

    def loss_share(self, loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This rank's mean loss over its local labels -> its share (see the module doc);
        `labels` [b, s]: the full sequence's."""
        valid = labels != IGNORE_INDEX
        here, total = self.local(valid).sum(), valid.sum().clamp(min=1)
        return loss * (self.size * here / total).to(loss.dtype)

    # -- attention ------------------------------------------------------------------------------

    def prepare(self, segments: torch.Tensor | None, *, seq_len: int, causal: bool, device) -> LocalSequence:
        """The masks every layer's attention uses this forward, built once: `segments` [b, s] are
        the full sequence's document numbers (or None), `seq_len` its length."""
        positions = torch.stack([self.positions(seq_len, device=device, rank=r) for r in range(self.size)])
        mine = positions[self.rank]
        q_seg = None if segments is None else segments[:, mine]
        if self.method == "all_gather":
            keys = positions.flatten()  # the gathered K/V's order: rank by rank
            k_seg = None if segments is None else segments[:, keys]
            return LocalSequence(positions, mask=visible(mine, keys, causal=causal, q_seg=q_seg, k_seg=k_seg))
        blocks = tuple(
            RingBlock.between(
                q_chunks=self.chunk_ids(self.rank),
                k_chunks=self.chunk_ids(r),
                q_pos=mine,
                k_pos=positions[r],
                causal=causal,
                q_seg=q_seg,
                k_seg=None if segments is None else segments[:, positions[r]],
            )
            for r in range(self.size)
        )
        return LocalSequence(positions, blocks=blocks)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        local: LocalSequence,
        *,
        dropout_p: float = 0.0,
        backend: str = "sdpa",
    ) -> torch.Tensor:
        """q [b, heads, s / cp, d], k, v [b, kv_heads, s / cp, d] of this rank's tokens ->
        attention output [b, heads, s / cp, d] over the whole sequence's keys; `backend`:
        model.attention_backend (the ring's block kernel follows it on CUDA)."""
        if self.method == "ring":
            key = (q.device.type, q.dtype, backend)
            if key not in self._kernels:
                self._kernels[key] = choose_kernel(self.block_kernel, device=q.device, dtype=q.dtype, backend=backend)
            kernel = self._kernels[key]
            return ring_attention(
                q, k, v, blocks=local.blocks, link=self.link, rank=self.rank, size=self.size, kernel=kernel
            )
        kv = gather_sequence_blocks(torch.stack([k, v]), self.group)  # [2, b, kv_heads, s, d]
        documents = None if local.mask is None else Documents(mask=local.additive_mask(q.dtype))
        return attention(q, kv[0], kv[1], dropout_p=dropout_p, causal=False, segments=documents)


class _GatherBlocks(torch.autograd.Function):
    """All-gather along dim 3 (the sequence of [2, b, heads, s, d]), rank by rank; backward:
    reduce-scatter of the gradient, so each rank gets the sum of every rank's gradient of its
    own block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group, size = group, dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        with waiting():
            dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=3)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        parts = [p.contiguous() for p in grad.chunk(size, dim=3)]
        out = torch.empty_like(parts[0])
        with waiting():
            dist.reduce_scatter(out, parts, group=ctx.group)
        return out, None


def gather_sequence_blocks(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherBlocks.apply(x, group)
