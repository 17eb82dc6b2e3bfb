"""The planner (pretrain/planner, tools/plan.py): exact parts checked against the code and
DeepSpeed's own estimator, suggestions that validate, and the tool's exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import config_from_dict, load_config, validate_layout
from pretrain.hardware import get_hardware
from pretrain.planner.activations import probe_activations
from pretrain.planner.memory import plan_memory, rank_parameter_split, rank_parameters
from pretrain.planner.suggest import plan, suggest

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"flavour": "gpt2", "num_layers": 8, "hidden_size": 256, "num_heads": 8, "vocab_size": 1000, "seq_length": 256}


def _config(model=None, **sections):
    return config_from_dict({"model": {**SMALL, **(model or {})}, **sections})


def _model_states_at_step(rank) -> int:
    m = rank.memory
    return m.weights + m.gradients + m.optimizer + m.step_transient


@pytest.mark.parametrize("dp", [2, 8])
def test_zero2_model_states_equal_deepspeeds_estimate(dp):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    config = _config(parallel={"zero_stage": 2}, train={"precision": "bf16", "global_batch_size": 8 * dp})
    (rank,) = plan_memory(config, dp)
    _, gpu = estimate_zero2_model_states_mem_needs(rank.parameters, num_gpus_per_node=dp, cpu_offload=False)
    assert abs(_model_states_at_step(rank) - gpu) <= 3  # integer division of three terms


def test_zero3_model_states_against_deepspeeds_estimate():
    """DeepSpeed's ZeRO-3 estimate leaves out the 16-bit gradient partition (2 bytes per
    parameter / N, measured in bench/memory.py) and adds 4 bytes per parameter of the largest
    layer for its gathers (an allocator buffer we count as a communication buffer)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    dp = 8
    config = _config(parallel={"zero_stage": 3}, train={"precision": "bf16", "global_batch_size": 8 * dp})
    (rank,) = plan_memory(config, dp)
    largest = config.model.vocab_rows * config.model.hidden_size  # the embedding
    _, gpu, largest_bytes = estimate_zero3_model_states_mem_needs(
        rank.parameters, largest, num_gpus_per_node=dp, cpu_offload=False, cpu_offload_params=False
    )
    ours = _model_states_at_step(rank)
    assert abs(ours - (gpu - largest_bytes + 2 * rank.parameters // dp)) <= 4


def test_parameters_per_rank_add_up_to_the_model():
    """Pipeline ranks of one tensor-parallel position hold the model once, plus the last stage's
    copy of a tied embedding; tensor-parallel shards add up to the unsharded count."""
    whole = rank_parameters(_config(), 0)
    tied = _config(parallel={"pipeline": 4, "virtual_stages": 2}, train={"global_batch_size": 8})
    embedding = tied.model.vocab_rows * tied.model.hidden_size
    assert sum(rank_parameters(tied, r) for r in range(4)) == whole + embedding
    tp = _config(parallel={"tensor": 2})
    h, layers, positions = 256, 8, 256
    # Replicated on both TP ranks: per layer two LayerNorms (weight + bias) and the row-parallel
    # biases (attention output, fc2), the final LayerNorm, the position table.
    replicated = layers * (4 * h + 2 * h) + 2 * h + positions * h
    assert 2 * rank_parameters(tp, 0) - replicated == whole


def test_activation_probe_matches_the_measured_coefficient():
    """bench/activation_memory.py measured 28 + 4t bytes per token and h/t for gpt2 with
    selective recompute and sequence parallelism (44 at t=4) on real tensors, with bf16 weights
    as ZeRO keeps them; full recompute keeps each block's input only (2 bytes of bf16 per token
    and h/t)."""
    for recompute, tp, coefficient in (("selective", 4, 44), ("selective", 2, 36), ("full", 4, 2)):
        config = _config(
            {"activation_checkpointing": recompute},
            parallel={"tensor": tp, "sequence_parallel": True, "zero_stage": 1},
            train={"precision": "bf16"},
        )
        tokens = config.train.micro_batch_size * config.model.seq_length
        per_token = tokens * config.model.hidden_size / tp
        assert probe_activations(config).per_block / per_token == pytest.approx(coefficient, abs=0.05)


def test_autocast_keeps_16_bit_weight_copies_per_micro_batch():
    """Without ZeRO the weights stay fp32 and autocast casts the block's matmul weights to bf16
    inside each micro-batch's forward; backward needs them, so every micro-batch in flight
    holds its own copies: 2 bytes per matmul weight of the block, on top of the activations
    (which also differ: with fp32 norm weights the norms' outputs are saved in fp32)."""
    common = {"parallel": {"tensor": 2, "sequence_parallel": True}, "train": {"precision": "bf16"}}
    fp32_weights = probe_activations(_config(**common)).per_block
    bf16_weights = probe_activations(_config(**{**common, "parallel": {**common["parallel"], "zero_stage": 1}}))
    h, tp = 256, 2
    matmul_weights = (3 * h * h + h * h + 2 * 4 * h * h) // tp  # QKV, proj, fc1, fc2: this rank's shard
    assert fp32_weights - bf16_weights.per_block >= 2 * matmul_weights


def test_pipeline_ranks_hold_the_micro_batches_1f1b_keeps_in_flight():
    config = _config(parallel={"pipeline": 4}, train={"global_batch_size": 16})
    ranks = plan_memory(config, 4)
    assert [r.in_flight for r in ranks] == [4, 3, 2, 1]
    assert ranks[0].memory.activations > ranks[-1].memory.activations - ranks[-1].memory.logits


def test_suggestions_are_valid_layouts_that_fit():
    hardware = get_hardware("h100")
    path = ROOT / "configs" / "gpt_1.3b.yaml"
    plans = suggest(lambda extra: load_config(path, extra), 16, hardware, top=3)
    assert plans
    for candidate in plans:
        config = load_config(path, list(candidate.overrides))
        validate_layout(config, 16)
        assert candidate.fits and 0 < candidate.step.mfu <= 1
    speeds = [c.step.tokens_per_s_per_gpu for c in plans]
    assert speeds == sorted(speeds, reverse=True)


def test_mfu_never_exceeds_one():
    config = load_config(ROOT / "configs" / "gpt_13b.yaml")
    for name in ("a100-40gb", "h100", "b200"):
        assert 0 < plan(config, 128, get_hardware(name)).step.mfu <= 1


def _plan_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plan.py"), *args], capture_output=True, text=True, timeout=300
    )


def test_plan_tool_exit_codes():
    fits = _plan_tool("configs/gpt_13b.yaml", "--gpus", "128", "--hardware", "h100", "--json")
    assert fits.returncode == 0, fits.stderr
    report = json.loads(fits.stdout)["plan"]
    assert report["fits"] and 15 * 2**30 < report["peak_bytes"] < 30 * 2**30
    no_zero_tp1 = ["parallel.tensor=1", "parallel.sequence_parallel=false", "parallel.zero_stage=0"]
    too_big = _plan_tool("configs/gpt_13b.yaml", *no_zero_tp1, "--gpus", "128", "--hardware", "h100")
    assert too_big.returncode == 1
    assert "DOES NOT FIT" in too_big.stdout and "parallel.tensor=" in too_big.stdout.split("fastest")[1]
    bad_world = _plan_tool("configs/gpt_13b.yaml", "--gpus", "100", "--hardware", "h100")
    assert bad_world.returncode == 2 and "not divisible" in bad_world.stderr
    bad_hardware = _plan_tool("configs/gpt_13b.yaml", "--gpus", "128", "--hardware", "v100")
    assert bad_hardware.returncode == 2 and "h100" in bad_hardware.stderr


def test_plan_tool_dry_run_reports_next_to_the_planner():
    """--dry-run simulates the first and the last rank at world size 8 (TP 2 x PP 2 x DP 2): the
    weights and gradients it measures are the planner's to the byte, the optimizer state but for
    AdamW's step counters (4 bytes per tensor, which the planner leaves to the host), the
    activations within 10%."""
    layout = ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2", "train.precision=bf16"]
    out = _plan_tool("configs/gpt_tiny.yaml", *layout, "--gpus", "8", "--hardware", "h100", "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    planned = {r["pp_rank"]: r for r in result["plan"]["ranks"]}
    assert [r["rank"] for r in result["dry_run"]] == [0, 7]
    for simulated in result["dry_run"]:
        plan_rank, peak = planned[simulated["coordinates"]["pp"]], simulated["peak"]
        for key in ("weights", "gradients"):
            assert peak[key] == plan_rank[key], key
        assert 0 <= peak["optimizer"] - plan_rank["optimizer"] <= 4 * 64  # step counters of < 64 tensors
        assert peak["activations"] == pytest.approx(max(plan_rank["activations"], plan_rank["step_transient"]), rel=0.1)


# -- expert parallelism ---------------------------------------------------------------------------

MOE = {"flavour": "llama", "moe": {"num_experts": 8, "top_k": 2, "ffn_hidden_size": 128}}


def _meta_model_counts(config, *, dp: int, pp_rank: int) -> tuple[int, int]:
    """(all, routed experts') parameters of the chunks the real code builds for the first rank of
    pipeline rank `pp_rank`, on the meta device."""
    import torch

    from pretrain.models.sharding import sharding
    from pretrain.parallel.model_chunks import build_model_chunks
    from pretrain.parallel.topology import grid_position

    p = config.parallel
    topo = grid_position(
        rank=pp_rank * p.tensor * dp,
        tp=p.tensor,
        pp=p.pipeline,
        dp=dp,
        ep=p.expert,
        virtual_stages=p.virtual_stages,
        device=torch.device("meta"),
    )
    params = [q for chunk in build_model_chunks(config.model, topo, init_seed=1) for q in chunk.parameters()]
    return sum(q.numel() for q in params), sum(q.numel() for q in params if sharding(q).expert)


@pytest.mark.parametrize(
    "layout",
    [
        {"expert": 2},
        {"expert": 8},
        {"expert": 4, "tensor": 2},
        {"expert": 2, "pipeline": 2, "virtual_stages": 2},
        {"expert": 4, "layer_interval": 2, "pipeline": 2},
    ],
    ids=["ep2", "ep8", "ep4-tp2", "ep2-pp2-vp2", "ep4-every-2nd-pp2"],
)
def test_parameters_at_expert_parallel_layouts_equal_the_meta_model(layout):
    """Each EP rank holds num_experts / EP experts of every MoE layer: the planner's count is the
    real model's at that layout, to the parameter, and its experts are E/EP x (SwiGLU's three
    h x f matrices / TP) per MoE layer."""
    layout = dict(layout)
    interval = layout.pop("layer_interval", 1)
    moe = {**MOE, "moe": {**MOE["moe"], "layer_interval": interval}}
    dp = 8
    micro = 2 * layout.get("pipeline", 1) * layout.get("virtual_stages", 1)
    config = _config(moe, parallel=layout, train={"micro_batch_size": 1, "global_batch_size": dp * micro})
    p, h, f = config.parallel, 256, 128
    moe_layers_per_rank = 8 // interval // p.pipeline
    for pp_rank in range(p.pipeline):
        planned = rank_parameter_split(config, pp_rank)
        assert planned == _meta_model_counts(config, dp=dp, pp_rank=pp_rank)
        assert planned[1] == moe_layers_per_rank * (8 // p.expert) * 3 * h * f // p.tensor
    (rank, *_) = plan_memory(config, dp * p.tensor * p.pipeline)
    assert (rank.parameters, rank.expert_parameters) == rank_parameter_split(config, 0)
    assert rank.memory.weights == 4 * rank.parameters  # no ZeRO: fp32 weights of what it holds


def test_expert_parallel_dry_run_holds_the_planned_parameters():
    """The dry run of an EP2 x DP2 layout (the real model, strategy and step on fake tensors)
    holds the planner's parameters, weights and gradients to the byte and its activations within
    10% (the tolerance of tests/test_dry_run.py); see also the CP layouts below."""
    _dry_run_against_planner(
        _config(MOE, parallel={"expert": 2}, train={"micro_batch_size": 1, "global_batch_size": 8}), world_size=2
    )


def _dry_run_against_planner(config, *, world_size: int) -> None:
    from pretrain.planner.dry_run import dry_run

    planned = plan_memory(config, world_size, overhead=False)
    for report in dry_run(config, world_size=world_size, micro_batches=1):
        plan_rank = planned[report.pp_rank]
        assert report.parameters == plan_rank.parameters
        assert report.peak.weights == plan_rank.memory.weights
        assert report.peak.gradients == plan_rank.memory.gradients
        # AdamW's step counters (4 bytes per parameter tensor, which the planner leaves to the host)
        assert 0 <= report.peak.optimizer - plan_rank.memory.optimizer <= 4 * 256  # < 256 tensors here
        assert report.peak.activations == pytest.approx(plan_rank.memory.activations, rel=0.1)


@pytest.mark.parametrize("attention", ["all_gather", "ring"])
def test_context_parallel_dry_run_against_the_planner(attention):
    config = _config(
        {"flavour": "llama", "num_kv_heads": 4, "seq_length": 512},
        parallel={"context": 2, "context_attention": attention},
        train={"micro_batch_size": 1, "global_batch_size": 4},
    )
    _dry_run_against_planner(config, world_size=2)


def test_zero_partitions_expert_state_over_the_expert_data_parallel_ranks():
    """Under ZeRO an expert's master copy and moments (and ZeRO-2's gradients, and the step's
    fp32 gradient partition) are split over the ranks holding that expert, data x context / EP
    of them, the rest over all data x context ranks (DeepSpeed's expert parameter groups)."""
    from pretrain.planner.memory import ReplicaGroups, _model_states

    params, experts = 1_000_000, 600_000
    groups = ReplicaGroups(dense=16, expert=4)  # DP 8 x CP 2, EP 4
    for stage, grad_bytes in ((1, 2 * params), (2, 2 * 400_000 // 16 + 2 * 600_000 // 4)):
        config = _config(parallel={"zero_stage": stage}, train={"precision": "bf16"})
        weights, grads, optimizer = _model_states(config, params, experts, groups)
        assert (weights, grads) == (2 * params, grad_bytes)
        assert optimizer == 12 * 400_000 // 16 + 12 * 600_000 // 4
    assert groups.sharded(4, params, experts) == 4 * 400_000 // 16 + 4 * 600_000 // 4
    config = _config(MOE, parallel={"expert": 4, "context": 1}, train={"micro_batch_size": 1, "global_batch_size": 16})
    assert ReplicaGroups.of(config, dp=8) == ReplicaGroups(dense=8, expert=2)


def _step(config, world_size, hardware="h100"):
    ranks = plan_memory(config, world_size)
    largest = max(ranks, key=lambda r: r.parameters)
    from pretrain.planner.timing import estimate_step

    return estimate_step(config, world_size, get_hardware(hardware), largest.parameters, largest.expert_parameters)


def test_expert_all_to_all_traffic():
    """Per MoE layer and micro-batch: dispatch and combine forward and backward, each sending
    (EP-1)/EP of the rank's b x s x top_k rows (fp32 residual rows out, 16-bit outputs back
    without ZeRO) over NVLink while the EP group stays in a node; none at EP 1."""
    from pretrain.planner.timing import LINK_EFFICIENCY, _expert_seconds

    hw = get_hardware("h100")
    base = {"train": {"micro_batch_size": 1, "global_batch_size": 16, "precision": "bf16"}}
    assert _expert_seconds(_config(MOE, **base), hw) == 0.0
    for ep in (2, 4, 8):
        config = _config(MOE, parallel={"expert": ep}, **base)
        rows = 1 * 256 * 2
        expected = 8 * 2 * (ep - 1) / ep * rows * 256 * (4 + 2) / (hw.intra_node_gbps * 1e9 * LINK_EFFICIENCY)
        assert _expert_seconds(config, hw) == pytest.approx(expected)
    inter = _config(MOE, parallel={"expert": 8, "tensor": 2}, **base)  # 16 consecutive ranks: two nodes
    assert _expert_seconds(inter, hw) > 8 * _expert_seconds(_config(MOE, parallel={"expert": 8}, **base), hw)
    step = _step(_config(MOE, parallel={"expert": 2}, **base), 2)
    parts = ("compute", "bubble", "tensor_parallel", "pipeline_transfers", "context_parallel", "expert_parallel")
    parts += ("data_parallel", "optimizer")
    assert step.expert_parallel > 0 and step.seconds == pytest.approx(sum(getattr(step, k) for k in parts))


def test_expert_parallel_mfu_counts_active_parameters():
    """MFU's FLOPs are the top-k experts' (pretrain/metrics.py), whatever EP holds in memory."""
    import dataclasses

    from pretrain.metrics import training_flops

    config = _config(
        MOE, parallel={"expert": 4}, train={"micro_batch_size": 1, "global_batch_size": 16, "precision": "bf16"}
    )
    step, hw = _step(config, 4), get_hardware("h100")
    flops = training_flops(config.model, batch=16, seq=256)
    assert step.mfu == pytest.approx(flops / (step.seconds * 4 * hw.peak("bf16") * 1e12))
    every_expert = dataclasses.replace(config.model, moe=dataclasses.replace(config.model.moe, top_k=8))
    assert training_flops(every_expert, batch=16, seq=256) > flops


# -- context parallelism --------------------------------------------------------------------------

LONG = {"flavour": "llama", "num_layers": 4, "hidden_size": 1024, "num_heads": 8, "num_kv_heads": 2}


def _cp_config(cp: int, attention: str, seq: int, recompute: str = "none"):
    return _config(
        {**LONG, "seq_length": seq, "activation_checkpointing": recompute},
        parallel={"context": cp, "context_attention": attention},
        train={"micro_batch_size": 1, "global_batch_size": 1, "precision": "bf16"},
    )


def test_context_parallel_traffic_scales_with_the_layout():
    """all_gather: per layer an all-gather of the whole sequence's K/V and a reduce-scatter of
    their gradient, (CP-1)/CP of it over the link each, so nearly flat in CP; recompute adds the
    forward's once more. ring, with the compute made free (a GPU of infinite peak): 2 (CP-1) 16-bit
    K/V blocks of s/CP tokens and CP fp32 dK/dV blocks per layer, all exposed; at 32k tokens on an
    H100 the attention of a block outlasts its transfer and only the last dK/dV hop shows."""
    import dataclasses

    from pretrain.planner.timing import LINK_EFFICIENCY, _context_seconds

    hw = get_hardware("h100")
    link = hw.intra_node_gbps * 1e9 * LINK_EFFICIENCY
    seq, layers, head_dim = 4096, 4, 128
    for cp in (2, 4, 8):
        kv = 2 * 2 * seq // cp * head_dim  # K and V elements of one rank (2 kv heads, micro-batch 1)
        gathered = 2 * kv * cp
        ag = _context_seconds(_cp_config(cp, "all_gather", seq), hw, sustained=1e30)
        assert ag == pytest.approx(layers * 2 * (cp - 1) / cp * gathered / link)
        ag_recompute = _context_seconds(_cp_config(cp, "all_gather", seq, "selective"), hw, sustained=1e30)
        assert ag_recompute == pytest.approx(1.5 * ag)
        ring = _context_seconds(_cp_config(cp, "ring", seq), hw, sustained=1e30)
        assert ring == pytest.approx(layers * (2 * (cp - 1) * 2 * kv + cp * 4 * kv) / link)
    # Longer sequences: the block's attention grows with (s/CP)^2, its transfer with s/CP.
    long = _cp_config(4, "ring", 32768)
    sustained = hw.peak("bf16") * 1e12 * 0.45
    dkv_hop = 4 * 2 * 2 * 32768 // 4 * head_dim / link
    assert _context_seconds(long, hw, sustained=sustained) == pytest.approx(layers * dkv_hop)
    # the step carries it, times the micro-batches
    step = _step(long, 4)
    assert step.context_parallel == pytest.approx(_context_seconds(long, hw, sustained=sustained))
    across = dataclasses.replace(hw, gpus_per_node=2)  # CP 4 now spans two nodes
    assert _context_seconds(long, across, sustained=sustained) > _context_seconds(long, hw, sustained=sustained)


def test_context_parallel_memory_shrinks_with_the_sequence_share():
    """Activations per rank a little over 1/CP of one rank's (each keeps s/CP tokens; what does
    not shrink: the all-gather's K/V of the whole sequence per layer). The all-gather also keeps
    one additive mask per forward, local queries x all keys in the compute dtype, counted once
    per chunk; the ring keeps no mask."""
    from pretrain.planner.activations import probe_activations

    seq = 8192
    one = plan_memory(_cp_config(1, "all_gather", seq), 1)[0].memory.activations
    for cp in (2, 4):
        for attention in ("all_gather", "ring"):
            config = _cp_config(cp, attention, seq)
            activations = plan_memory(config, cp)[0].memory.activations
            assert one / cp < activations < 1.25 * one / cp, (cp, attention)
            mask = seq // cp * seq * 2  # [1, 1, s/CP, s] bf16
            per_chunk = probe_activations(config).per_chunk
            assert per_chunk >= mask if attention == "all_gather" else per_chunk < mask / 10


# -- refusals -------------------------------------------------------------------------------------


def test_plan_tool_refuses_layouts_the_code_cannot_run():
    """Exit 2 with the config's own message: EP that does not divide the experts or the
    data-parallel size, MoE under ZeRO-3."""
    moe = ["model.moe.num_experts=8", "model.flavour=llama"]
    cases = [
        (["parallel.expert=3"], "does not divide model.moe.num_experts"),
        (["parallel.expert=4"], "does not divide the data-parallel size"),
        (["parallel.zero_stage=3"], "parallel.zero_stage"),
    ]
    for overrides, message in cases:
        out = _plan_tool("configs/llama_tiny.yaml", *moe, *overrides, "--gpus", "2", "--hardware", "h100")
        assert out.returncode == 2 and message in out.stderr, (overrides, out.stderr)
