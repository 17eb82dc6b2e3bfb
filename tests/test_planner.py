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
from pretrain.planner.memory import plan_memory, rank_parameters
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
