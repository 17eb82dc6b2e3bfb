"""Per-GPU memory of a layout, by category, for every pipeline rank.

What is exact: the parameters each rank holds (the real model built on the meta device at the
layout, so padding, tied copies and uneven stages are counted as the code builds them), the
bytes each training strategy keeps per parameter (bench/RESULTS.md "memory": measured equal to
this accounting), the activations one micro-batch keeps (activations.py: counted on the model
code itself) and how many micro-batches each pipeline rank holds at once (the real schedule,
replayed). What is estimated, and labelled so: communication buffers and the framework's
overhead (CUDA context, NCCL, allocator slack), which depend on the GPU stack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pretrain.config import RunConfig, validate_layout
from pretrain.planner.activations import probe_activations

MIB, GIB = 2**20, 2**30
# A CUDA context with cuBLAS/cuDNN workspaces and NCCL's per-communicator buffers (~0.5 GiB
# each on H100 with default NCCL_BUFFSIZE and channels, for the TP, DP and PP groups), and the
# caching allocator's fragmentation: an estimate, not a measurement on this CPU-only machine.
CONTEXT_BYTES = 2 * GIB
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class PlannedMemory:
    """Bytes one GPU holds at its peak, by what holds them."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    """Saved for backward by the micro-batches in flight at the peak, logits included."""
    logits: int
    """Of activations: the output layer and loss's share (last stage)."""
    step_transient: int
    """Held only during the optimizer step, when the activations are gone: DeepSpeed's fp32
    copy of the rank's gradient partition (4 bytes per parameter it updates)."""
    comm_buffers: int
    overhead: int

    @property
    def owned(self) -> int:
        """What the framework's own tensors take at their peak (backward or optimizer step),
        communication buckets included: the part checked against measurements."""
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + max(self.activations, self.step_transient)
            + self.comm_buffers
        )

    @property
    def total(self) -> int:
        return self.owned + self.overhead


@dataclass(frozen=True)
class RankMemory:
    pp_rank: int
    parameters: int
    expert_parameters: int
    """Of parameters, the routed experts' (model.moe): under expert parallelism this rank's
    num_experts / parallel.expert of them, reduced and (ZeRO) partitioned over the expert-data-
    parallel ranks instead of all data x context ranks."""
    in_flight: int
    """Micro-batch chunks (forwards without their backward yet) at this rank's peak."""
    memory: PlannedMemory


def plan_memory(config: RunConfig, world_size: int, *, overhead: bool = True) -> list[RankMemory]:
    """Memory of every pipeline rank of the config's layout on `world_size` GPUs (ranks of one
    stage hold the same, up to DeepSpeed's alignment padding). `overhead=False` leaves out what
    is not a tensor (CUDA context, NCCL, allocator slack), which this CPU cannot check. Raises
    ConfigError for a layout that cannot run at that size."""
    dp = validate_layout(config, world_size)
    probe = probe_activations(config)
    ranks = []
    groups = ReplicaGroups.of(config, dp)
    for pp_rank in range(config.parallel.pipeline):
        params, experts = rank_parameter_split(config, pp_rank)
        weights, grads, optimizer = _model_states(config, params, experts, groups)
        transient = groups.sharded(4, params, experts) if config.parallel.zero_stage else 0
        activations, in_flight = _peak_activations(config, pp_rank, probe, dp)
        comm = _comm_buffers(config)
        owned = weights + grads + optimizer + max(activations, transient) + comm
        extra = int(CONTEXT_BYTES + FRAGMENTATION * owned) if overhead else 0
        last = pp_rank == config.parallel.pipeline - 1
        logits = probe.head if last else 0
        memory = PlannedMemory(weights, grads, optimizer, activations, logits, transient, comm, extra)
        ranks.append(RankMemory(pp_rank, params, experts, in_flight, memory))
    return ranks


def model_state_floor(config: RunConfig, world_size: int) -> int:
    """The least the fullest pipeline rank needs whatever its activations: weights, gradients,
    optimizer state and the CUDA context. Cheap (no activation probe): --suggest drops layouts
    over the memory limit with it before planning them."""
    dp = validate_layout(config, world_size)
    groups = ReplicaGroups.of(config, dp)
    states = []
    for pp_rank in range(config.parallel.pipeline):
        params, experts = rank_parameter_split(config, pp_rank)
        states.append(sum(_model_states(config, params, experts, groups)))
    return max(states) + CONTEXT_BYTES


def peak_rank(ranks: list[RankMemory]) -> RankMemory:
    return max(ranks, key=lambda r: r.memory.total)


@dataclass(frozen=True)
class ReplicaGroups:
    """Over how many ranks a parameter's gradient is averaged and its ZeRO state partitioned:
    dense parameters over the data x context ranks of their TP/PP position; the routed experts'
    under expert parallelism over the expert-data-parallel group, the data x context ranks
    holding the same experts (parallel.expert times fewer: Topology.expert_dp_group)."""

    dense: int
    expert: int

    @staticmethod
    def of(config: RunConfig, dp: int) -> ReplicaGroups:
        replicas = dp * config.parallel.context
        return ReplicaGroups(dense=replicas, expert=replicas // config.parallel.expert)

    def sharded(self, width: int, params: int, experts: int) -> int:
        """Bytes per rank of `width` bytes per parameter partitioned over each one's group."""
        return width * (params - experts) // self.dense + width * experts // self.expert


def _model_states(config: RunConfig, params: int, experts: int, groups: ReplicaGroups) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes for `params` parameters on one rank, `experts`
    of them routed experts.

    Our data parallelism keeps fp32 weights (autocast runs the matmuls in 16 bits) that double
    as the master copy, fp32 gradients in the flat DP buckets and AdamW's two fp32 moments.
    DeepSpeed ZeRO keeps the weights and gradients in the compute dtype and shards its fp32
    master copy and moments (12 bytes) over the DP ranks; stage 2 also the gradients, stage 3
    also the weights (Rajbhandari et al. 2020). With expert parallelism the experts' partitions
    span their expert-data-parallel group only (DeepSpeed's expert parameter groups do the same:
    an expert's state can only be split among the ranks that hold that expert)."""
    stage = config.parallel.zero_stage
    if stage == 0:
        return 4 * params, 4 * params, 8 * params
    width = torch.tensor([], dtype=config.compute_dtype).element_size()
    weights = groups.sharded(width, params, experts) if stage == 3 else width * params
    grads = groups.sharded(width, params, experts) if stage >= 2 else width * params
    return weights, grads, groups.sharded(12, params, experts)


def _comm_buffers(config: RunConfig) -> int:
    """DeepSpeed's reduce and all-gather buckets (parallel.bucket_mb each; ZeRO-3 also its
    prefetch bucket). Our own DP reduction runs in place on the gradients' buffers: nothing."""
    stage = config.parallel.zero_stage
    if stage == 0:
        return 0
    return int((3 if stage == 3 else 2) * config.parallel.bucket_mb * MIB)


def _peak_activations(config: RunConfig, pp_rank: int, probe, dp: int) -> tuple[int, int]:
    """The most bytes the schedule keeps at once on pipeline rank `pp_rank`, and how many chunk
    forwards are then waiting for their backward (under a zero-bubble schedule: for their W,
    which keeps the layers' inputs and output gradients until then; counted as the whole
    forward's, an upper bound)."""
    from pretrain.parallel.model_chunks import stage_index

    p = config.parallel
    layers_per_chunk = config.model.num_layers // (p.pipeline * p.virtual_stages)
    v_shape, releases = p.schedule == "zb-v", "W" if p.schedule in ("zb-h1", "zb-v") else "B"
    last_stage = p.pipeline * p.virtual_stages - 1

    def cost(chunk: int) -> int:
        virtual = stage_index(pp=p.pipeline, pp_rank=pp_rank, chunk=chunk, v_shape=v_shape)
        first, last = virtual == 0, virtual == last_stage
        own = layers_per_chunk * probe.per_block + probe.per_chunk
        return own + (probe.embedding if first else 0) + (probe.head if last else 0)

    def backward(chunk: int) -> int:  # what a backward through the chunk adds at its highest
        last = stage_index(pp=p.pipeline, pp_rank=pp_rank, chunk=chunk, v_shape=v_shape) == last_stage
        return probe.backward_last if last else probe.backward_middle

    live: list[int] = []
    peak, at_peak = 0, 0
    for kind, chunk in _schedule_ops(config, pp_rank, dp):
        if kind == "F":
            live.append(chunk)
        held = sum(cost(c) for c in live) + (backward(chunk) if kind == "B" else 0)
        if held > peak:
            peak, at_peak = held, len(live)
        if kind == releases:
            live.remove(chunk)
    return peak, at_peak


def _schedule_ops(config: RunConfig, pp_rank: int, dp: int) -> list[tuple[str, int]]:
    """The (kind, chunk) operations of the real schedule on this pipeline rank, in order."""
    from pretrain.parallel.pipeline import flatten, make_schedule
    from pretrain.parallel.topology import grid_position

    p = config.parallel
    micro = config.accumulation_steps(dp)
    if p.pipeline == 1:  # one micro-batch's forward and backward back to back
        return [(k, 0) for _ in range(micro) for k in "FB"]
    topo = grid_position(
        rank=pp_rank * p.tensor,
        tp=p.tensor,
        pp=p.pipeline,
        virtual_stages=p.virtual_stages,
        pipeline_schedule=p.pipeline_schedule,
    )
    return [(op.kind, op.chunk) for op in flatten(make_schedule(topo, micro))]


def rank_parameters(config: RunConfig, pp_rank: int) -> int:
    """Parameters pipeline rank `pp_rank` holds (one tensor- and expert-parallel shard)."""
    return rank_parameter_split(config, pp_rank)[0]


def rank_parameter_split(config: RunConfig, pp_rank: int) -> tuple[int, int]:
    """(all, routed experts') parameters pipeline rank `pp_rank` holds, counted on the model
    built on the meta device at the rank's TP and EP layout (an EP rank builds num_experts /
    parallel.expert experts of each MoE layer): nothing is allocated, a 70B model counts in a
    second."""
    from pretrain.parallel.model_chunks import stage_layout

    p, m = config.parallel, config.model
    total = experts = 0
    for chunk in range(p.virtual_stages):
        stage = stage_layout(
            num_layers=m.num_layers,
            pp=p.pipeline,
            vp=p.virtual_stages,
            pp_rank=pp_rank,
            chunk=chunk,
            v_shape=p.schedule == "zb-v",
        )
        moe_blocks = sum(1 for i in stage.layer_ids if m.moe is not None and m.moe.is_moe_layer(i))
        kinds = {"dense": len(stage.layer_ids) - moe_blocks, "moe": moe_blocks}
        for kind, blocks in kinds.items():
            if not blocks:
                continue
            all_, expert = _block_parameters(m, p.tensor, p.expert, kind)
            total, experts = total + blocks * all_, experts + blocks * expert
        total += _end_parameters(m, p.tensor, stage.first, stage.last)
    return total, experts


def _block_parameters(model, tp: int, ep: int, kind: str) -> tuple[int, int]:
    """(all, routed experts') parameters of one dense or one MoE block at TP x EP."""
    key = (repr(model), tp, ep, kind)
    if key not in _COUNTS:
        # A one-block model whose block is of that kind (every block a MoE layer, or none).
        moe = None if kind == "dense" else dataclasses.replace(model.moe, layer_interval=1)
        one = dataclasses.replace(model, num_layers=1, moe=moe)
        with_block, with_block_experts = _count_on_meta(one, tp, ep, blocks=1, first=False, last=False)
        ends, _ = _count_on_meta(one, tp, ep, blocks=0, first=False, last=False)
        _COUNTS[key] = (with_block - ends, with_block_experts)
    return _COUNTS[key]


def _end_parameters(model, tp: int, first: bool, last: bool) -> int:
    """What a stage's ends add: the embedding (first), the final norm and output layer (last)."""
    key = (repr(model), tp, first, last)
    if key not in _COUNTS:
        _COUNTS[key] = _count_on_meta(model, tp, 1, blocks=0, first=first, last=last)[0]
    return _COUNTS[key]


_COUNTS: dict[tuple, object] = {}


def _count_on_meta(model, tp: int, ep: int, *, blocks: int, first: bool, last: bool) -> tuple[int, int]:
    """(all, routed experts') parameters of the model's first `blocks` blocks and the ends asked
    for, built on the meta device as an EP rank builds them (pretrain/parallel/model_chunks.py)."""
    from pretrain.models.build import build_gpt
    from pretrain.models.gpt import Stage
    from pretrain.models.layers import DenseLayers
    from pretrain.models.sharding import sharding
    from pretrain.parallel.expert import ExpertParallel
    from pretrain.parallel.tensor import TensorParallelLayers
    from pretrain.parallel.topology import grid_position

    meta = torch.device("meta")
    topo = grid_position(tp=tp, dp=ep, ep=ep, device=meta)
    layers = TensorParallelLayers(topo) if tp > 1 else DenseLayers()
    layers.expert_parallel = ExpertParallel.of(topo)
    one = dataclasses.replace(model, num_layers=max(blocks, 1))
    gpt = build_gpt(one, init_seed=1, device=meta, layers=layers, stage=Stage(range(blocks), first, last))
    params = list(gpt.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if sharding(p).expert)
