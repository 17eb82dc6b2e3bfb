"""Estimated step time of a layout on given GPUs: matmuls at a sustained fraction of the peak,
tensor-parallel collectives over NVLink (not overlapped, as in our code), pipeline transfers
and bubble (1F1B, interleaved), the data-parallel reduction over the node's link and how much
of it hides behind the last micro-batch's backward, ZeRO's gathers, and the optimizer step
(memory bound). Calibrated against published H100/A100 runs (bench/RESULTS.md, "Planner").
Context parallelism divides each rank's tokens (compute, TP and pipeline traffic) by CP and
widens the gradient reduction to data x context ranks; its own K/V traffic (all-gather or ring,
overlapped with attention by the ring) is not modelled.
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
    data_parallel: float
    """The exposed part of the DP reduction and ZeRO's gathers."""
    optimizer: float
    tokens_per_s_per_gpu: float
    mfu: float


def estimate_step(config: RunConfig, world_size: int, hardware: Hardware, params_per_rank: int) -> StepTime:
    """`params_per_rank`: the largest pipeline rank's parameter count (planner.memory)."""
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
    parts = {
        "compute": micro * per_micro,
        "bubble": bubble_share * micro * per_micro,
        "tensor_parallel": micro * _tensor_parallel_seconds(config, hardware) * (1 + bubble_share),
        "pipeline_transfers": micro * _pipeline_transfer_seconds(config, hardware),
        # Gradients are reduced, and ZeRO partitions, over the data x context ranks.
        "data_parallel": _data_parallel_seconds(config, hardware, dp * p.context, params_per_rank, micro, per_micro),
        "optimizer": _optimizer_seconds(config, hardware, dp * p.context, params_per_rank),
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


def _data_parallel_seconds(
    config: RunConfig, hw: Hardware, dp: int, params: int, micro: int, per_micro: float
) -> float:
    """The exposed part of the step's DP traffic. Ours: an all-reduce of the fp32 gradients,
    started during the last micro-batch's backward. ZeRO-1: a reduce-scatter of the 16-bit
    gradients there too, then an all-gather of the updated weights after the step (nothing to
    hide it behind). ZeRO-2: the reduce-scatter during every micro-batch's backward, the
    all-gather after the step. ZeRO-3: each micro-batch gathers the weights for its forward and
    backward (prefetched: hidden behind the compute as far as it lasts) and reduce-scatters."""
    if dp == 1:
        return 0.0
    p = config.parallel
    bandwidth = hw.inter_node_gbps if p.tensor * dp > hw.gpus_per_node else hw.intra_node_gbps
    backward = 2 / 3 * per_micro
    if p.zero_stage == 0:
        return max(0.0, 2 * _ring(4 * params, dp, bandwidth) - backward)
    shard = _ring(_width(config) * params, dp, bandwidth)  # one reduce-scatter or all-gather
    if p.zero_stage == 1:
        return max(0.0, shard - backward) + shard
    if p.zero_stage == 2:
        return micro * max(0.0, shard - backward) + shard
    return micro * max(0.0, 3 * shard - per_micro)


def _optimizer_seconds(config: RunConfig, hw: Hardware, dp: int, params: int) -> float:
    """AdamW is memory bound: it reads and writes weights, gradients, master copy and moments
    (about 2 x 16 bytes per parameter it updates)."""
    updated = params if config.parallel.zero_stage == 0 else params / dp
    return 32 * updated / (hw.hbm_gbps * 1e9)


def _width(config: RunConfig) -> int:
    """Bytes per element of what travels: activations, 16-bit gradients and weights."""
    return config.compute_dtype.itemsize
