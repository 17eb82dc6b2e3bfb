"""The TP x DP x PP grid of ranks: one object, validated and built once, passed down explicitly.

Rank order follows Megatron: tensor-parallel ranks are contiguous (so a TP group stays inside
a node, where its all-reduces are cheapest), then data-parallel, then pipeline:

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

There are no process-group globals: every function that communicates takes the Topology (or
one of its groups). A single process (world size 1) has no groups at all and every
collective short-circuits, so the single-device code path pays nothing.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# validate_layout lives with the other config rules; imported from here by its older callers.
from pretrain.config import RunConfig, validate_layout

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
    tp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    dp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    pp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    # All ranks of one model replica (TP x PP): grad-norm and loss reductions.
    model_group: dist.ProcessGroup | None = field(default=None, repr=False)
    # First and last pipeline stage of one TP/DP position: keeps tied embeddings in sync.
    embedding_group: dist.ProcessGroup | None = field(default=None, repr=False)

    # Coordinates of this rank.
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def global_rank(self, *, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return pp_rank * (self.dp * self.tp) + dp_rank * self.tp + tp_rank

    def pp_peer(self, offset: int) -> int:
        """Global rank of the pipeline stage `offset` away (wrapping), same TP and DP position."""
        return self.global_rank(tp_rank=self.tp_rank, dp_rank=self.dp_rank, pp_rank=(self.pp_rank + offset) % self.pp)

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints and writes metrics: last stage (it has the loss), TP 0, DP 0."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp}, "
            f"dp {self.dp_rank}/{self.dp}, pp {self.pp_rank}/{self.pp}"
            + (f" x {self.virtual_stages} virtual" if self.virtual_stages > 1 else "")
        )


def single_process(device: torch.device = CPU) -> Topology:
    """The one-rank grid: no process groups, every collective a no-op."""
    return Topology(world_size=1, rank=0, tp=1, pp=1, dp=1, virtual_stages=1, sequence_parallel=False, device=device)


def init_distributed(config: RunConfig, *, device: torch.device, launch=None) -> Topology:
    """Build the Topology for this process.

    Under torchrun, srun or mpirun (pretrain/launch.py finds the ranks and the master), joins
    the default process group (NCCL on GPU, gloo on CPU) with parallel.timeout_minutes, prints
    one line per node, and creates the TP/DP/PP groups. Alone, returns a one-rank Topology
    without any process group. The layout is validated before any process group starts.
    """
    from pretrain.launch import announce_nodes, discover, start_process_group

    launch = launch or discover()
    dp = validate_layout(config, launch.world_size)
    p = config.parallel
    if launch.world_size == 1:
        return single_process(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        start_process_group(launch, backend=backend, timeout_minutes=p.timeout_minutes)
        announce_nodes(launch, backend=backend, device=str(device))
    return build_topology(
        tp=p.tensor,
        pp=p.pipeline,
        dp=dp,
        virtual_stages=p.virtual_stages,
        sequence_parallel=p.sequence_parallel,
        device=device,
        timeout_minutes=p.timeout_minutes,
    )


def group_timeout(minutes: float | None) -> datetime.timedelta | None:
    """parallel.timeout_minutes as new_group's `timeout=`. A new group does not inherit the
    default group's timeout (it gets the backend's default: 30 min on gloo, 10 on NCCL), so every
    group must be given it explicitly or a lost peer blocks its partners for half an hour."""
    return None if minutes is None else datetime.timedelta(minutes=minutes)


def build_topology(
    *,
    tp: int,
    pp: int,
    dp: int,
    virtual_stages: int = 1,
    sequence_parallel: bool = False,
    device: torch.device = CPU,
    timeout_minutes: float | None = None,
) -> Topology:
    """Create all groups of the grid over an initialised default process group; each waits at
    most `timeout_minutes` (parallel.timeout_minutes) in a collective.

    Every rank must call new_group for every group, in the same order, even the groups it is
    not in; that is why all groups are enumerated here, once.
    """
    world_size, rank = dist.get_world_size(), dist.get_rank()
    assert world_size == tp * pp * dp, (world_size, tp, pp, dp)
    topo = Topology(
        world_size=world_size,
        rank=rank,
        tp=tp,
        pp=pp,
        dp=dp,
        virtual_stages=virtual_stages,
        sequence_parallel=sequence_parallel,
        device=device,
    )
    g = topo.global_rank
    mine: dict[str, dist.ProcessGroup | None] = {}
    timeout = group_timeout(timeout_minutes)

    def make(kind: str, ranks: list[int]) -> None:
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine[kind] = group

    for pp_rank in range(pp):
        for dp_rank in range(dp):
            make("tp_group", [g(tp_rank=t, dp_rank=dp_rank, pp_rank=pp_rank) for t in range(tp)])
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            make("dp_group", [g(tp_rank=tp_rank, dp_rank=d, pp_rank=pp_rank) for d in range(dp)])
    for dp_rank in range(dp):
        for tp_rank in range(tp):
            make("pp_group", [g(tp_rank=tp_rank, dp_rank=dp_rank, pp_rank=s) for s in range(pp)])
            make(
                "embedding_group",
                sorted(
                    {
                        g(tp_rank=tp_rank, dp_rank=dp_rank, pp_rank=0),
                        g(tp_rank=tp_rank, dp_rank=dp_rank, pp_rank=pp - 1),
                    }
                ),
            )
    for dp_rank in range(dp):
        make("model_group", [g(tp_rank=t, dp_rank=dp_rank, pp_rank=s) for s in range(pp) for t in range(tp)])
    return Topology(**{**topo.__dict__, **mine})
