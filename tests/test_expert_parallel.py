"""Expert parallelism (parallel.expert): experts split over EP ranks carved out of the data-parallel
ranks, tokens exchanged by all-to-all with variable counts, composed with TP (+SP), PP (1F1B and
interleaved), DP and activation checkpointing.

- Training, fp32, 3 optimizer steps (warmup, clipping, AdamW) on the harness's batches: losses
  and gradient norms equal the single-process MoE run's within 2e-5, for EP 2 alone and with
  TP 2 + SP, PP 2 (1F1B, interleaved), DP 4 (EP groups inside it: expert gradients averaged over
  the other EP group only) and activation checkpointing; also with every token routed to EP
  rank 0's experts, so EP rank 1 receives no tokens in any layer (forward and backward).
  Several layouts share one spawn of ranks.
- DeepSpeed ZeRO-1/2 with EP 2 inside DP 4 (also with EP rank 1 receiving no tokens, with the
  optimizer offloaded, and with gpt2's expert biases), EP 2 x PP 2 and EP 2 x CP 2: the same,
  and DeepSpeed partitions the dense groups over data x context and the expert groups over the
  ranks holding the same experts (checked on every rank).
- A training step at EP 2 x DP 4 under the NCCL-rules model.
- Validation before any process group (ZeRO-3 with EP refused, citing DeepSpeed's check).
- Checkpoints resume at another EP (and TP/DP, ZeRO or not) size with the uninterrupted run's
  losses, ZeRO-1/2 checkpoints with EP included.
"""

from __future__ import annotations

import pytest
import torch
from parallel_harness import build_trainer, make_config, run_job, run_ranks

from pretrain.config import ConfigError, validate_layout

TOL = 2e-5
MOE = [
    "model.flavour=llama",
    "model.num_kv_heads=2",
    "model.moe.num_experts=4",
    "model.moe.ffn_hidden_size=32",
    "model.moe.aux_loss_coeff=1.0",  # strong, so a wrong aux-loss gradient shows in the norms
    "model.moe.z_loss_coeff=0.1",
    "model.moe.shared_experts=1",
]
GROUPED = [*MOE, "model.moe.grouped_mm=true"]
# The sigmoid router chooses by score + bias: a bias of 100 on experts 0 and 1 (top-2) sends every
# token there, i.e. to EP rank 0, for all 3 steps (the bias update moves it by 0.01 a step).
SKEWED = [*MOE, "model.moe.router=sigmoid", "model.moe.bias_update_rate=0.01", "model.moe.aux_loss_coeff=0.0"]
EP2 = ["parallel.expert=2"]
GPT2 = ["model.flavour=gpt2", *MOE[2:]]

# name -> (reference overrides, the layout's, whether the router is skewed)
LAYOUTS_2 = {
    "ep2_loop": (MOE, EP2, False),
    "ep2_grouped_mm": (GROUPED, EP2, False),
    "ep2_checkpointing": (MOE, [*EP2, "model.activation_checkpointing=full"], False),
    "ep2_rank1_gets_no_tokens": (SKEWED, EP2, True),
    "ep2_rank1_gets_no_tokens_grouped_mm": (SKEWED + ["model.moe.grouped_mm=true"], EP2, True),
}
LAYOUTS_4 = {
    "ep2_tp2_sp": (MOE, [*EP2, "parallel.tensor=2", "parallel.sequence_parallel=true"], False),
    "ep2_tp2": (GROUPED, [*EP2, "parallel.tensor=2"], False),
    "ep2_pp2_1f1b": (MOE, [*EP2, "parallel.pipeline=2"], False),
    "ep2_pp2_interleaved": (MOE, [*EP2, "parallel.pipeline=2", "parallel.virtual_stages=2"], False),
    "ep2_in_dp4": (MOE, [*EP2, "parallel.bucket_mb=0.01"], False),
    "ep2_in_dp4_rank1_gets_no_tokens": (SKEWED, EP2, True),
}
# DeepSpeed ZeRO-1/2 with the experts in its expert parameter groups (pretrain/parallel/
# zero_experts.py): dense weights partitioned over DP 4, experts over the 2 ranks holding them (at
# EP 2 x PP 2 over this rank alone); small buckets, so buckets mix expert and dense gradients.
ZERO = ["parallel.bucket_mb=0.01"]
LAYOUTS_4_ZERO = {
    "ep2_in_dp4_zero1": (MOE, [*EP2, *ZERO, "parallel.zero_stage=1"], False),
    "ep2_in_dp4_zero2": (MOE, [*EP2, *ZERO, "parallel.zero_stage=2"], False),
    "ep2_in_dp4_zero2_rank1_gets_no_tokens": (SKEWED, [*EP2, *ZERO, "parallel.zero_stage=2"], True),
    "ep2_in_dp4_zero2_offload": (MOE, [*EP2, *ZERO, "parallel.zero_stage=2", "parallel.offload_optimizer=true"], False),
    "ep2_pp2_zero1": (MOE, [*EP2, *ZERO, "parallel.pipeline=2", "parallel.zero_stage=1"], False),
    # the experts' groups span the context-parallel ranks too
    "ep2_cp2_zero2": (MOE, [*EP2, *ZERO, "parallel.context=2", "parallel.zero_stage=2"], False),
    # gpt2's experts have output biases: an expert group with weight decay and one without
    "gpt2_ep2_in_dp4_zero1": (GPT2, [*EP2, *ZERO, "parallel.zero_stage=1"], False),
}
# layout -> rank -> (the DP group's ranks, the ranks holding the same experts): rank order tp-dp-pp
# with TP 1, EP groups of consecutive DP ranks.
ZERO_GROUPS = {
    "ep2_in_dp4_zero1": lambda rank: ([0, 1, 2, 3], [rank % 2, rank % 2 + 2]),
    "ep2_in_dp4_zero2": lambda rank: ([0, 1, 2, 3], [rank % 2, rank % 2 + 2]),
    "ep2_in_dp4_zero2_rank1_gets_no_tokens": lambda rank: ([0, 1, 2, 3], [rank % 2, rank % 2 + 2]),
    "ep2_in_dp4_zero2_offload": lambda rank: ([0, 1, 2, 3], [rank % 2, rank % 2 + 2]),
    "ep2_pp2_zero1": lambda rank: ([rank // 2 * 2, rank // 2 * 2 + 1], [rank]),  # DP 2 = EP 2
    # rank order tp-cp-dp-pp: data x context = all 4, the same experts = both CP ranks of a DP rank
    "ep2_cp2_zero2": lambda rank: ([0, 1, 2, 3], [rank // 2 * 2, rank // 2 * 2 + 1]),
    "gpt2_ep2_in_dp4_zero1": lambda rank: ([0, 1, 2, 3], [rank % 2, rank % 2 + 2]),
}


def _skew(trainer) -> None:
    """Every token's top-2 = experts 0 and 1 (EP rank 0's at EP 2)."""
    with torch.no_grad():
        for chunk in trainer.chunks:
            for block in chunk.blocks.values():
                block.mlp.router.expert_bias[:2] = 100.0


def _train(overrides: list[str], skewed: bool) -> dict:
    config = make_config(overrides)
    trainer = build_trainer(config, 3)
    if skewed:
        _skew(trainer)
    records = [trainer.step(step) for step in (1, 2, 3)]
    result = {
        "logging": trainer.topo.is_logging_rank,
        "loss": [r["loss"] for r in records],
        "grad_norm": [r["grad_norm"] for r in records],
        "tokens": [[v["tokens_per_expert"] for _, v in sorted(r["moe_layers"].items())] for r in records],
    }
    if config.parallel.zero_stage:
        result["zero_groups"] = _zero_groups(trainer.strategy.optimizer)
    return result


def _zero_groups(optimizer) -> list[tuple[bool, list[int], int]]:
    """Per parameter group of DeepSpeed's ZeRO-1/2 optimizer: whether it is an expert group, the
    global ranks it is partitioned and reduced over, and its parameters' count."""
    import torch.distributed as dist

    groups = zip(optimizer.optimizer.param_groups, optimizer.real_dp_process_group, optimizer.bit16_groups)
    return [(bool(group.get("moe")), dist.get_process_group_ranks(pg), len(params)) for group, pg, params in groups]


def _layouts_worker(layouts: dict) -> dict:
    results = {name: _train(reference + layout, skewed) for name, (reference, layout, skewed) in layouts.items()}
    trainer = build_trainer(make_config(MOE + EP2), 1)  # every rank: building groups is collective
    held = {k.split(".experts.")[1].split(".")[0] for k in trainer.chunks[0].state_dict() if ".experts." in k}
    results["experts_held"] = (trainer.topo.ep_rank, sorted(held))
    return results


_references: dict = {}


def _reference(overrides: list[str], skewed: bool) -> dict:
    key = (tuple(overrides), skewed)
    if key not in _references:
        _references[key] = _train(overrides, skewed)
    return _references[key]


@pytest.mark.parametrize(
    "world, layouts", [(2, LAYOUTS_2), (4, LAYOUTS_4), (4, LAYOUTS_4_ZERO)], ids=["world2", "world4", "world4_zero"]
)
def test_layouts_train_like_one_process(world, layouts):
    per_rank = run_ranks(world, _layouts_worker, layouts)
    for r in per_rank:  # EP rank 0 holds experts 0 and 1, EP rank 1 experts 2 and 3, by global index
        assert r["experts_held"] == (0, ["0", "1"]) or r["experts_held"] == (1, ["2", "3"])
    for name, groups_of in ZERO_GROUPS.items():
        for rank, r in enumerate(per_rank if name in layouts else []):
            dense, experts = groups_of(rank)
            groups = r[name]["zero_groups"]
            # Dense groups over DP, the experts' (every MoE layer's) over the ranks holding them
            assert any(moe for moe, _, n in groups if n) and any(not moe for moe, _, n in groups if n), name
            assert all(ranks == (experts if moe else dense) for moe, ranks, _ in groups), (name, rank, groups)
    deviations = {}
    for name, (reference, _, skewed) in layouts.items():
        (got,) = [r[name] for r in per_rank if r[name]["logging"]]
        ref = _reference(reference, skewed)
        assert got["loss"] == pytest.approx(ref["loss"], abs=TOL, rel=0), name
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], abs=TOL, rel=0), name
        assert got["tokens"] == ref["tokens"], name
        assert ref["loss"][0] != ref["loss"][-1]
        if skewed:  # nothing reached experts 2 and 3 (EP rank 1) in any layer or step
            assert all(layer[2] == layer[3] == 0 for step in got["tokens"] for layer in step), name
        deviations[name] = (
            max(abs(a - b) for a, b in zip(got["loss"], ref["loss"])),
            max(abs(a - b) for a, b in zip(got["grad_norm"], ref["grad_norm"])),
        )
    print("largest |loss - reference|, |grad norm - reference| per layout:", deviations)


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.expert=2"], 2, "parallel.expert: 2 needs model.moe"),
        ([*MOE, "parallel.expert=3"], 3, "3 does not divide model.moe.num_experts=4"),
        ([*MOE, "parallel.expert=4"], 2, "4 does not divide the data-parallel size 2"),
        ([*MOE, "parallel.expert=2", "parallel.tensor=2"], 2, "2 does not divide the data-parallel size 1"),
        ([*MOE, "parallel.expert=2", "parallel.zero_stage=3"], 2, "_validate_zero3_moe_compatibility"),
        ([*MOE, "parallel.expert=0"], 1, "parallel.expert: must be >= 1"),
    ],
)
def test_bad_expert_layouts_are_refused_before_any_process_group(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        validate_layout(make_config(overrides), world)


# -- NCCL's rules -----------------------------------------------------------------------------


def _step_trace_worker(overrides: list[str]) -> str:
    from pretrain.parallel.nccl_rules import CommRecorder, dump_trace

    with CommRecorder() as rec:
        trainer = build_trainer(make_config(overrides), 2)
        _skew(trainer)
        for step in (1, 2):
            trainer.step(step)
    return dump_trace(rec.events)


@pytest.mark.parametrize(
    "strategy",
    [[], ["parallel.zero_stage=2"], ["parallel.pipeline=2", "parallel.zero_stage=1"]],
    ids=["dp4", "dp4_zero2", "pp2_zero1"],
)
def test_a_training_step_at_ep2_follows_nccl_rules(strategy):
    """EP 2 inside DP 4 (without ZeRO, with ZeRO-2) or EP 2 x PP 2 with ZeRO-1 (EP = DP: one-rank
    expert groups), every token routed to EP rank 0 (rank 1 sends and receives empty splits):
    the all-to-alls over the EP groups, the expert buckets (ours or DeepSpeed's) over the expert
    data-parallel groups and the others over DP are issued alike by every member of each group,
    and every rank creates the same groups. (The same with a pipeline: tests/test_nccl_rules.py.)"""
    from pretrain.parallel.nccl_rules import check_nccl_rules, load_trace

    overrides = [*SKEWED, *EP2, "parallel.bucket_mb=0.01", *strategy]
    traces = dict(enumerate(map(load_trace, run_ranks(4, _step_trace_worker, overrides))))
    summary = check_nccl_rules(traces)
    assert summary["collectives"] > 0
    ops = [op for e in traces[0] for op in e.ops]
    # Per rank: 4 MoE layers x 2 steps x 1 micro-batch (PP 2: 2 layers x 2 micro-batches) x
    # (forward: counts, rows there, rows back; backward: the two rows' exchanges reversed), empty
    # splits included
    assert sum(op.name == "all_to_all_single" for op in ops) == 4 * 2 * 1 * 5, summary


# -- checkpoints do not depend on EP ----------------------------------------------------------


ZERO1, ZERO2 = ["parallel.zero_stage=1"], ["parallel.zero_stage=2"]


@pytest.mark.parametrize(
    "saved_at, world, resumed_at, resumed_world",
    [
        (EP2, 2, [], 1),
        ([], 1, EP2, 2),
        (EP2, 2, [*EP2, "parallel.tensor=2"], 4),
        # ZeRO: each rank writes its fragments of the fp32 masters and Adam moments, the experts'
        # partitioned over the ranks holding them (pretrain/parallel/zero_experts.py)
        ([*EP2, *ZERO1], 4, ["parallel.expert=4", *ZERO1], 4),  # same layout and stage, other EP
        ([*EP2, *ZERO2], 2, [], 1),
        ([], 1, [*EP2, *ZERO2], 2),
    ],
    ids=[
        "ep2_to_one_process",
        "one_process_to_ep2",
        "ep2_to_ep2_tp2",
        "ep2_zero1_dp4_to_ep4_zero1",
        "ep2_zero2_to_one_process",
        "one_process_to_ep2_zero2",
    ],
)
def test_checkpoint_resumes_at_another_ep_size(tmp_path, saved_at, world, resumed_at, resumed_world):
    """Saved after step 2 (weights and AdamW moments, experts keyed by global index), resumed at
    another EP (and TP/DP) size: steps 3 and 4 as in the uninterrupted run."""
    straight = run_job(MOE + saved_at, world=world, last=4, save=str(tmp_path), save_at=2)
    straight = next(r for r in straight if r["logging"])
    resumed = run_job(MOE + resumed_at, world=resumed_world, first=3, last=4, resume=str(tmp_path / "step_2"))
    resumed = next(r for r in resumed if r["logging"])
    assert resumed["loss"] == pytest.approx(straight["loss"][2:], abs=TOL, rel=0)
    assert resumed["grad_norm"] == pytest.approx(straight["grad_norm"][2:], abs=TOL, rel=0)
    assert straight["loss"][3] != straight["loss"][2]
