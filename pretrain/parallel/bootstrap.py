"""Process-group bootstrap: join the default process group and create the grid's groups, once,
at start (pretrain/parallel/topology.py holds the resulting value).

Every group waits at most parallel.timeout_minutes in a collective: a new group does not inherit
the default group's timeout, so each is given it explicitly (`group_timeout`).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterator

import torch
import torch.distributed as dist

from pretrain.config import RunConfig, validate_layout
from pretrain.parallel.topology import CPU, Topology, grid_position, single_process


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
    return layout_topology(config, dp=dp, device=device)


def layout_topology(config: RunConfig, *, dp: int, device: torch.device) -> Topology:
    """build_topology at the config's layout, over the process group already running (a real
    one, or the dry run's fake one)."""
    p = config.parallel
    return build_topology(
        tp=p.tensor,
        pp=p.pipeline,
        dp=dp,
        cp=p.context,
        context_attention=p.context_attention,
        virtual_stages=p.virtual_stages,
        pipeline_schedule=p.pipeline_schedule,
        sequence_parallel=p.sequence_parallel,
        ep=p.expert,
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
    cp: int = 1,
    context_attention: str = "all_gather",
    virtual_stages: int = 1,
    pipeline_schedule: str | None = None,
    sequence_parallel: bool = False,
    ep: int = 1,
    device: torch.device = CPU,
    timeout_minutes: float | None = None,
) -> Topology:
    """Create all groups of the grid over an initialised default process group; each waits at
    most `timeout_minutes` (parallel.timeout_minutes) in a collective."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    assert world_size == tp * pp * dp * cp, (world_size, tp, pp, dp, cp)
    topo = grid_position(
        rank=rank,
        tp=tp,
        pp=pp,
        dp=dp,
        cp=cp,
        virtual_stages=virtual_stages,
        context_attention=context_attention,
        pipeline_schedule=pipeline_schedule,
        ep=ep,
        device=device,
    )
    topo = dataclasses.replace(topo, sequence_parallel=sequence_parallel)
    timeout = group_timeout(timeout_minutes)
    mine: dict[str, dist.ProcessGroup | None] = {}
    for kind, ranks in grid_groups(topo):
        # Every rank creates every group, even those it is not in: new_group is collective.
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine[kind] = group
    # Data x context is one of the two when the other has size 1: the same ranks, no new group.
    if cp == 1:
        mine["dp_cp_group"] = mine.get("dp_group")
    elif dp == 1:
        mine["dp_cp_group"] = mine.get("cp_group")
    return Topology(**{**topo.__dict__, **mine})


def grid_groups(topo: Topology) -> Iterator[tuple[str, list[int]]]:
    """(Topology field, its ranks) for every group of the grid, in the one order every rank must
    create them in (new_group matches calls by order, so any rank-dependent order would pair
    different groups on different ranks): TP, CP, DP, data x context, PP with the embedding
    group, model; the EP and expert data-parallel groups (only at EP > 1) come before PP. The CP
    and data x context groups exist only with CP > 1 (and the latter only with DP > 1 too;
    build_topology reuses the one group of the same ranks otherwise), so a grid without context
    or expert parallelism creates exactly the groups it always did."""
    g, tp, cp, dp, pp = topo.global_rank, topo.tp, topo.cp, topo.dp, topo.pp
    positions = [(c, d) for d in range(dp) for c in range(cp)]  # (cp_rank, dp_rank) in rank order
    for pp_rank in range(pp):
        for c, d in positions:
            yield "tp_group", [g(tp_rank=t, cp_rank=c, dp_rank=d, pp_rank=pp_rank) for t in range(tp)]
    if cp > 1:
        for pp_rank in range(pp):
            for d in range(dp):
                for t in range(tp):
                    yield "cp_group", [g(tp_rank=t, cp_rank=c, dp_rank=d, pp_rank=pp_rank) for c in range(cp)]
    for pp_rank in range(pp):
        for c in range(cp):
            for t in range(tp):
                yield "dp_group", [g(tp_rank=t, cp_rank=c, dp_rank=d, pp_rank=pp_rank) for d in range(dp)]
    if cp > 1 and dp > 1:
        for pp_rank in range(pp):
            for t in range(tp):
                replicas = [g(tp_rank=t, cp_rank=c, dp_rank=d, pp_rank=pp_rank) for c, d in positions]
                yield "dp_cp_group", sorted(replicas)
    yield from _expert_groups(topo)
    for c, d in positions:
        for t in range(tp):
            yield "pp_group", [g(tp_rank=t, cp_rank=c, dp_rank=d, pp_rank=s) for s in range(pp)]
            # The ranks of the first and the last stage: zb-v puts both on pipeline rank 0 (a group
            # of one; its tied copies are summed within the rank, pretrain/parallel/tied.py).
            last = 0 if topo.v_shape else pp - 1
            ends = {g(tp_rank=t, cp_rank=c, dp_rank=d, pp_rank=0), g(tp_rank=t, cp_rank=c, dp_rank=d, pp_rank=last)}
            yield "embedding_group", sorted(ends)
    for c, d in positions:
        yield "model_group", [g(tp_rank=t, cp_rank=c, dp_rank=d, pp_rank=s) for s in range(pp) for t in range(tp)]


def _expert_groups(topo: Topology) -> Iterator[tuple[str, list[int]]]:
    """EP groups: `ep` consecutive DP ranks (same TP, CP, PP position), which split the experts;
    expert data-parallel groups: the data x context ranks of a TP/PP position with the same
    ep_rank (the same experts), over which expert gradients are averaged; created only when
    they have more than one rank (so EP 1 creates nothing new)."""
    g, tp, cp, dp, pp, ep = topo.global_rank, topo.tp, topo.cp, topo.dp, topo.pp, topo.ep
    if ep == 1:
        return
    for pp_rank in range(pp):
        for block in range(dp // ep):
            for c in range(cp):
                for t in range(tp):
                    ranks = [g(tp_rank=t, cp_rank=c, dp_rank=block * ep + e, pp_rank=pp_rank) for e in range(ep)]
                    yield "ep_group", ranks
    if dp // ep * cp == 1:
        return
    for pp_rank in range(pp):
        for t in range(tp):
            for e in range(ep):
                ranks = [
                    g(tp_rank=t, cp_rank=c, dp_rank=block * ep + e, pp_rank=pp_rank)
                    for block in range(dp // ep)
                    for c in range(cp)
                ]
                yield "expert_dp_group", sorted(ranks)
