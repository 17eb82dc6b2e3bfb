"""The TP x CP x DP x PP grid of ranks: one object, validated and built once, passed down
explicitly.

Rank order follows Megatron (`tp-cp-dp-pp`): tensor-parallel ranks are contiguous (so a TP group
stays inside a node, where its all-reduces are cheapest), then context-parallel (its K/V
all-gathers or ring transfers run every layer, so they come next in closeness), then
data-parallel, then pipeline:

    rank = pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank

Context-parallel ranks hold the same weights and the same samples (each a part of every
sequence), so for gradients they are replicas like data-parallel ranks: gradients are averaged,
and ZeRO partitions, over the data x context ranks of a TP/PP position (`dp_cp_group`,
`replicas`, `replica_rank`). With CP = 1 that group is the DP group and nothing changes.

There are no process-group globals: every function that communicates takes the Topology (or
one of its groups). A single process (world size 1) has no groups at all and every
collective short-circuits, so the single-device code path pays nothing.

This module is the value only; joining the default process group and creating the grid's
groups is pretrain/parallel/bootstrap.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    virtual_stages: int
    sequence_parallel: bool
    device: torch.device
    cp: int = 1
    # parallel.context_attention: how attention crosses the CP ranks ("all_gather" or "ring").
    context_attention: str = "all_gather"
    # parallel.pipeline_schedule ("1f1b", "interleaved", "zb-h1", "zb-v"); None: 1F1B, or
    # interleaved 1F1B when virtual_stages > 1 (pretrain/parallel/pipeline.py make_schedule).
    pipeline_schedule: str | None = None
    # parallel.expert: EP ranks carved out of the DP ranks (consecutive DP ranks form an EP
    # group, as in Megatron); 1 without expert parallelism.
    ep: int = 1
    tp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    dp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    pp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    # The CP ranks of one TP/DP/PP position: they split each sequence between them.
    cp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    # The data x context ranks of one TP/PP position (the DP group when CP = 1): gradient
    # averaging, ZeRO's partitions, loss means.
    dp_cp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    # The DP ranks that split the experts between them (None at EP 1): tokens go by all-to-all.
    ep_group: dist.ProcessGroup | None = field(default=None, repr=False)
    # The data x context ranks holding the same experts (None when that is this rank alone):
    # expert gradients are averaged over it, not over dp_cp_group.
    expert_dp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    # All ranks of one model replica (TP x PP at one DP/CP position): grad-norm reductions.
    model_group: dist.ProcessGroup | None = field(default=None, repr=False)
    # First and last pipeline stage of one TP/DP position: keeps tied embeddings in sync (under
    # zb-v both stages are pipeline rank 0: a group of that one rank).
    embedding_group: dist.ProcessGroup | None = field(default=None, repr=False)

    # Coordinates of this rank.
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp) % self.cp

    @property
    def dp_rank(self) -> int:
        return (self.rank // (self.tp * self.cp)) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.cp * self.dp)

    @property
    def ep_rank(self) -> int:
        """This rank's place in its EP group: it holds experts [ep_rank x E/ep, (ep_rank+1) x E/ep)."""
        return self.dp_rank % self.ep

    @property
    def replicas(self) -> int:
        """Ranks holding the same weights (one TP/PP position): data x context."""
        return self.dp * self.cp

    @property
    def replica_rank(self) -> int:
        """This rank's index among them, in global-rank order (its rank in dp_cp_group)."""
        return self.dp_rank * self.cp + self.cp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def v_shape(self) -> bool:
        """ZB-V: rank r holds stages r and 2p-1-r, so the first and the last stage (the
        embedding and the loss) are both on pipeline rank 0."""
        return self.pipeline_schedule == "zb-v"

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank holds the model's last stage (the loss)."""
        return self.pp_rank == (0 if self.v_shape else self.pp - 1)

    def global_rank(self, *, tp_rank: int, cp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return ((pp_rank * self.dp + dp_rank) * self.cp + cp_rank) * self.tp + tp_rank

    def pp_peer(self, offset: int) -> int:
        """Global rank of the pipeline stage `offset` away (wrapping), same TP, CP and DP position."""
        return self.global_rank(
            tp_rank=self.tp_rank, cp_rank=self.cp_rank, dp_rank=self.dp_rank, pp_rank=(self.pp_rank + offset) % self.pp
        )

    def cp_peer(self, offset: int) -> int:
        """Global rank of the context-parallel rank `offset` away (wrapping): the ring's neighbours."""
        return self.global_rank(
            tp_rank=self.tp_rank, cp_rank=(self.cp_rank + offset) % self.cp, dp_rank=self.dp_rank, pp_rank=self.pp_rank
        )

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints and writes metrics: last stage (it has the loss), TP 0, CP 0, DP 0."""
        return self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0 and self.dp_rank == 0

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp}, "
            + (f"cp {self.cp_rank}/{self.cp} ({self.context_attention}), " if self.cp > 1 else "")
            + f"dp {self.dp_rank}/{self.dp}, "
            + (f"ep {self.ep_rank}/{self.ep}, " if self.ep > 1 else "")
            + f"pp {self.pp_rank}/{self.pp}"
            + (f" x {self.virtual_stages} virtual" if self.virtual_stages > 1 else "")
            + (f" ({self.pipeline_schedule})" if self.pp > 1 and self.pipeline_schedule else "")
        )


def grid_position(
    *,
    rank: int = 0,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    cp: int = 1,
    virtual_stages: int = 1,
    sequence_parallel: bool = False,
    context_attention: str = "all_gather",
    pipeline_schedule: str | None = None,
    ep: int = 1,
    device: torch.device = CPU,
) -> Topology:
    """Rank `rank` of the tp x cp x dp x pp grid, without process groups yet: what bootstrap.py
    fills in, and what the planner asks about a position (its schedule, its shards) without any."""
    return Topology(
        world_size=tp * pp * dp * cp,
        rank=rank,
        tp=tp,
        pp=pp,
        dp=dp,
        virtual_stages=virtual_stages,
        sequence_parallel=sequence_parallel,
        device=device,
        cp=cp,
        context_attention=context_attention,
        pipeline_schedule=pipeline_schedule,
        ep=ep,
    )


def single_process(device: torch.device = CPU) -> Topology:
    """The one-rank grid: no process groups, every collective a no-op."""
    return grid_position(device=device)
