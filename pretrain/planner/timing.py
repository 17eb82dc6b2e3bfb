"""Estimated step time of a layout on given GPUs: matmuls at a sustained fraction of the peak,
tensor-parallel collectives over NVLink (not overlapped, as in our code), pipeline transfers
and bubble (1F1B, interleaved), the data-parallel reduction over the node's link and how much
of it hides behind the last micro-batch's backward, ZeRO's gathers, and the optimizer step
(memory bound). Calibrated against published H100/A100 runs (bench/RESULTS.md, "Planner").
Context parallelism divides each rank's tokens (compute, TP and pipeline traffic) by CP, widens
the gradient reduction to data x context ranks and adds its own K/V traffic (`_context_seconds`:
the all-gather's blocking collectives, the ring's transfers where they outlast the block of
attention they overlap). Expert parallelism adds the MoE layers' all-to-all dispatch and combine
(`_expert_seconds`) and reduces the experts' gradients over the expert-data-parallel ranks only;
MFU counts the active parameters (top-k experts: pretrain/metrics.py training_flops).
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import RunConfig, validate_layout
from pretrain.hardware import Hardware
from pretrain.metrics import training_flops

# The fraction of the dense peak a training step's forward and backward sustain, all kernels
# included (norms, softmax, elementwise), per GPU: calibrated against published runs
# (bench/RESULTS.md, "Planner"): torchtitan's A100 runs reach 56-58% MFU, H100s 33-47%
# (torchtitan at 500 W, Megatron-LM's "up to 47%"); B200 has no published figure we could
# check and takes H100's. A measured CPU profile is its own peak.
SUSTAINED = {"a100-40gb": 0.6, "a100-80gb": 0.6, "h100": 0.45, "h200": 0.45, "b200": 0.45}
# Ring collectives reach about this fraction of the link's one-direction bandwidth.
LINK_EFFICIENCY = 0.8


@dataclass(frozen=True)
class StepTime:
    seconds: float
    compute: float
    """Matmuls and the rest of the forward/backward (recomputation included), all micro-batches."""
    bubble: float
    tensor_parallel: float
    pipeline_transfers: float
    context_parallel: float
    """Context parallelism's K/V traffic where compute does not hide it (all micro-batches)."""
    expert_parallel: float
    """The MoE layers' all-to-all token dispatch and combine, forward and backward."""
    data_parallel: float
    """The exposed part of the DP reduction and ZeRO's gathers."""
    optimizer: float
    tokens_per_s_per_gpu: float
    mfu: float


def estimate_step(
    config: RunConfig, world_size: int, hardware: Hardware, params_per_rank: int, expert_params: int = 0
) -> StepTime:
    """`params_per_rank`: the largest pipeline rank's parameter count (planner.memory), of which
    `expert_params` are routed experts (their gradients travel over the expert-DP group)."""
    dp = validate_layout(config, world_size)
    p, m = config.parallel, config.model
    peak = hardware.peak(config.train.precision) * 1e12
    micro = config.accumulation_steps(dp)
    tokens = config.global_batch(dp) * m.seq_length
    model_flops = training_flops(m, batch=config.global_batch(dp), seq=m.seq_length)
    per_micro = (
        model_flops * _recompute_factor(config) / world_size / micro / (peak * SUSTAINED.get(hardware.name, 1.0))
    )
    bubble_share = _bubble_share(config, micro)  # of the step's compute, the pipeline idles
    sustained = peak * SUSTAINED.get(hardware.name, 1.0)
    # Gradients are reduced, and ZeRO partitions, over the data x context ranks; the experts'
    # over those holding the same experts (planner.memory.ReplicaGroups).
    replicas = dp * p.context
    grads = [(params_per_rank - expert_params, replicas), (expert_params, replicas // p.expert)]
    # Collectives inside each micro-batch's forward and backward lengthen every pipeline slot,
    # the bubble's too (as tensor parallelism's do).
    in_slot = micro * (1 + bubble_share)
    parts = {
        "compute": micro * per_micro,
        "bubble": bubble_share * micro * per_micro,
        "tensor_parallel": in_slot * _tensor_parallel_seconds(config, hardware),
        "pipeline_transfers": micro * _pipeline_transfer_seconds(config, hardware),
        "context_parallel": in_slot * _context_seconds(config, hardware, sustained),
        "expert_parallel": in_slot * _expert_seconds(config, hardware),
        "data_parallel": _data_parallel_seconds(config, hardware, grads, micro, per_micro),
        "optimizer": _optimizer_seconds(config, hardware, grads),
    }
    seconds = sum(parts.values())
    mfu = model_flops / (seconds * world_size * peak)
    return StepTime(seconds=seconds, tokens_per_s_per_gpu=tokens / seconds / world_size, mfu=mfu, **parts)


def _bubble_share(config: RunConfig, micro: int) -> float:
    """Idle time over compute time: 1F1B's (p-1)/m, interleaving's divided by its chunks; the
    zero-bubble schedules' from their own simulation (pretrain/parallel/zero_bubble.py)."""
    p = config.parallel
    if p.schedule in ("zb-h1", "zb-v") and p.pipeline > 1:
        from pretrain.parallel.zero_bubble import figures

        f = figures(pp=p.pipeline, micro_batches=micro, v_shape=p.schedule == "zb-v")
        return (f["makespan"] - f["work"]) / f["work"]
    return (p.pipeline - 1) / (p.virtual_stages * micro)


def _recompute_factor(config: RunConfig) -> float:
    """Executed FLOPs over model FLOPs: full recompute repeats every block's forward (a third of
    forward + backward); selective repeats the attention core, which with flash kernels is all
    the attention products' forward (4 b s^2 h per layer of 12 counted)."""
    m = config.model
    mode = m.activation_checkpointing
    if mode == "full":
        return 4 / 3
    if mode == "selective":
        total = training_flops(m, batch=1, seq=m.seq_length)
        attention = 12 * m.seq_length**2 * m.num_layers * m.hidden_size
        return 1 + attention / 3 / total
    return 1.0


def _ring(bytes_: float, group: int, bandwidth_gbps: float) -> float:
    """One all-gather or reduce-scatter of `bytes_` (the whole tensor) over a ring of `group`."""
    return (group - 1) / group * bytes_ / (bandwidth_gbps * 1e9 * LINK_EFFICIENCY)


def _tensor_parallel_seconds(config: RunConfig, hw: Hardware) -> float:
    """One micro-batch's TP collectives on one stage: per layer two in the forward and two in
    the backward (all-gather + reduce-scatter with sequence parallelism, all-reduce = both
    without), plus the forward's again when recomputing whole blocks."""
    p, m = config.parallel, config.model
    if p.tensor == 1:
        return 0.0
    width = _width(config)
    # a context-parallel rank's share of the sequence
    activation = config.train.micro_batch_size * m.seq_length // p.context * m.hidden_size * width
    bandwidth = hw.intra_node_gbps if p.tensor <= hw.gpus_per_node else hw.inter_node_gbps
    per_layer = 4 * 2 * _ring(activation, p.tensor, bandwidth)
    if m.activation_checkpointing == "full":
        per_layer *= 1.5
    return per_layer * m.num_layers / p.pipeline


def _pipeline_transfer_seconds(config: RunConfig, hw: Hardware) -> float:
    """One micro-batch's activation forward and its gradient back, per virtual stage boundary."""
    p, m = config.parallel, config.model
    if p.pipeline == 1:
        return 0.0
    width = _width(config)
    shard = p.tensor if p.sequence_parallel else 1
    activation = config.train.micro_batch_size * m.seq_length // p.context * m.hidden_size * width / shard
    bandwidth = hw.inter_node_gbps if p.tensor * p.pipeline > hw.gpus_per_node else hw.intra_node_gbps
    return 2 * p.virtual_stages * activation / (bandwidth * 1e9 * LINK_EFFICIENCY)


def _context_seconds(config: RunConfig, hw: Hardware, sustained: float) -> float:
    """One micro-batch's exposed context-parallel traffic on one stage (pretrain/parallel/
    context.py, ring_attention.py). A rank's K/V block: 2 x b x kv_heads/t x s/CP x d, 16-bit.

    all_gather, per layer: one all-gather of the stacked K/V (the whole sequence's) in the
    forward and one reduce-scatter of their gradient in the backward, blocking (nothing overlaps
    them), plus the forward's all-gather again when recompute (selective or full) reruns the
    attention core.

    ring, per layer: the forward passes CP - 1 K/V blocks round the ring, each transfer posted
    before the attention on the block held, so it overlaps that block's compute; the backward
    passes the K/V blocks again (CP - 1) and each block's dK/dV accumulator (fp32, CP hops: the
    last one brings it home after the last block, with nothing left to overlap). Counted per
    ring step as max(0, transfer - compute): the compute of one block is this rank's queries
    against one block of keys (4 b (s/CP)^2 h / t FLOPs forward, halved by the causal mask with
    the load-balanced chunks; the backward's five products 2.5x that) at the sustained rate."""
    p, m = config.parallel, config.model
    cp = p.context
    if cp == 1:
        return 0.0
    b, s_local = config.train.micro_batch_size, m.seq_length // cp
    elements = 2 * b * (m.kv_heads // p.tensor) * s_local * m.head_dim  # one rank's K and V
    bandwidth = hw.intra_node_gbps if p.tensor * cp <= hw.gpus_per_node else hw.inter_node_gbps
    link = bandwidth * 1e9 * LINK_EFFICIENCY
    recomputed = m.activation_checkpointing != "none"  # selective and full both rerun the core
    layers = m.num_layers / p.pipeline
    if p.context_attention == "all_gather":
        gathered = _width(config) * elements * cp
        collectives = 3 if recomputed else 2  # forward all-gather (again), backward reduce-scatter
        return layers * collectives * _ring(gathered, cp, bandwidth)
    kv = _width(config) * elements / link
    dkv = 4 * elements / link  # the accumulators travel in fp32
    block_forward = 0.5 * 4 * b * s_local * s_local * m.hidden_size / p.tensor / sustained
    block_backward = 2.5 * block_forward
    forward = (cp - 1) * max(0.0, kv - block_forward)
    # step 0: K/V only; steps 1..CP-2: K/V and the previous step's dK/dV; step CP-1: dK/dV only;
    # then the last dK/dV hop, exposed whole.
    backward = max(0.0, kv - block_backward) + (cp - 2) * max(0.0, kv + dkv - block_backward)
    backward += max(0.0, dkv - block_backward) + dkv
    return layers * ((2 if recomputed else 1) * forward + backward)


def _expert_seconds(config: RunConfig, hw: Hardware) -> float:
    """One micro-batch's all-to-all on one stage (pretrain/parallel/expert.py): per MoE layer the
    token-expert rows go to the EP rank holding their expert (dispatch) and the outputs come back
    (combine), and the backward runs both in reverse; full recompute repeats the forward's. Each
    rank holds all b x s/CP tokens of its sequences at the MoE layer (sequence parallelism
    gathers them), top_k rows each, and sends (EP-1)/EP of them away: rows in the weights' dtype
    (the residual stream), outputs in the compute dtype. Blocking, and counted at equal load
    (the busiest rank sets the pace when routing is uneven); the counts exchanged before each
    dispatch are a few bytes per expert (latency only, not counted)."""
    p, m = config.parallel, config.model
    if p.expert == 1 or m.moe is None:
        return 0.0
    from pretrain.strategy import weight_dtype

    rows = config.train.micro_batch_size * m.seq_length // p.context * m.moe.top_k
    bytes_per_row = m.hidden_size * (weight_dtype(config).itemsize + _width(config))  # dispatch + combine
    span = p.tensor * p.context * p.expert  # EP ranks are consecutive DP ranks
    bandwidth = hw.intra_node_gbps if span <= hw.gpus_per_node else hw.inter_node_gbps
    one_way = (p.expert - 1) / p.expert * rows * bytes_per_row / (bandwidth * 1e9 * LINK_EFFICIENCY)
    passes = 3 if m.activation_checkpointing == "full" else 2  # forward (again), backward
    moe_layers = len(m.moe.layer_ids(m.num_layers)) / p.pipeline
    return moe_layers * passes * one_way


def _data_parallel_seconds(
    config: RunConfig, hw: Hardware, grads: list[tuple[int, int]], micro: int, per_micro: float
) -> float:
    """The exposed part of the step's DP traffic; `grads`: (parameters, ranks they are reduced
    over) per group (dense over data x context, experts over the expert-DP ranks). Ours: an
    all-reduce of the fp32 gradients, started during the last micro-batch's backward. ZeRO-1: a
    reduce-scatter of the 16-bit gradients there too, then an all-gather of the updated weights
    after the step (nothing to hide it behind). ZeRO-2: the reduce-scatter during every
    micro-batch's backward, the all-gather after the step. ZeRO-3: each micro-batch gathers the
    weights for its forward and backward (prefetched: hidden behind the compute as far as it
    lasts) and reduce-scatters."""
    p = config.parallel
    # Both groups span the data x context ranks of the position (the expert-DP group strided).
    replicas = max(group for _, group in grads)
    if replicas == 1:
        return 0.0
    bandwidth = hw.inter_node_gbps if p.tensor * replicas > hw.gpus_per_node else hw.intra_node_gbps
    backward = 2 / 3 * per_micro
    if p.zero_stage == 0:
        return max(0.0, sum(2 * _ring(4 * n, group, bandwidth) for n, group in grads) - backward)
    # one reduce-scatter or all-gather of the 16-bit values
    shard = sum(_ring(_width(config) * n, group, bandwidth) for n, group in grads)
    if p.zero_stage == 1:
        return max(0.0, shard - backward) + shard
    if p.zero_stage == 2:
        return micro * max(0.0, shard - backward) + shard
    return micro * max(0.0, 3 * shard - per_micro)


def _optimizer_seconds(config: RunConfig, hw: Hardware, grads: list[tuple[int, int]]) -> float:
    """AdamW is memory bound: it reads and writes weights, gradients, master copy and moments
    (about 2 x 16 bytes per parameter it updates: under ZeRO its partition of each group)."""
    partitioned = config.parallel.zero_stage > 0
    updated = sum(n / group if partitioned else n for n, group in grads)
    return 32 * updated / (hw.hbm_gbps * 1e9)


def _width(config: RunConfig) -> int:
    """Bytes per element of what travels: activations, 16-bit gradients and weights."""
    return config.compute_dtype.itemsize
