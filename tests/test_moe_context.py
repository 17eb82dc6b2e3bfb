"""Mixture of experts under context parallelism, and gpt2's experts (output biases) under expert
parallelism.

- Context parallelism: each CP rank routes its s/cp tokens of every sequence; the load-balancing
  loss takes the micro-batch's tokens per expert (summed over the CP group) and this rank's mean
  router probabilities, the z-loss this rank's mean, the step's records and the sigmoid router's
  bias update the counts of all ranks. Training, fp32, 3 optimizer steps on the harness's
  batches: losses, gradient norms, tokens per expert and the aux/z figures equal the
  single-process run's, with the softmax router at aux 1.0 and z 0.1 (a wrong router gradient
  shows in the norms), with the sigmoid router and its bias update, with ring attention, with
  EP 2 (EP ranks from the DP ranks of one CP position), TP 2 + SP and PP 2.
- gpt2 with expert parallelism: each expert's output bias is added on its own EP rank, on TP rank
  0 only; EP 2, EP 2 x TP 2 (with and without SP, loop and grouped matmul) equal one process.
- A training step at CP 2 x EP 2 with ring attention under the NCCL-rules model.
- With a capacity factor under context parallelism, each expert is filled first come first
  served in the whole micro-batch's token order (every CP rank's choices gathered): the same
  drops as on one device, with CP alone, TP 2 + SP and EP 2.
"""

from __future__ import annotations

import pytest
import torch
from parallel_harness import build_trainer, make_config, run_ranks
from test_moe import moe_figures

# As tests/test_context_parallel.py: 2e-5 absolute on the losses (and the aux and z figures), on
# the first step's gradient norm (before any update), 1e-4 relative on the later norms, where
# AdamW's first updates (~ g / |g| per element) magnify rounding: measured up to 1.7e-5 on norms
# of 6.6 for gpt2 at TP 2 with or without EP (a dense-MoE TP 2 run deviates as much).
TOL = 2e-5
NORM_TOL = 1e-4
ROUTED = ["model.moe.num_experts=4", "model.moe.ffn_hidden_size=32", "model.moe.shared_experts=1"]
# Strong auxiliary losses, so that a wrong router gradient shows in the norms.
SOFTMAX = ["model.moe.aux_loss_coeff=1.0", "model.moe.z_loss_coeff=0.1"]
LLAMA = ["model.flavour=llama", "model.num_kv_heads=2", *ROUTED, *SOFTMAX]
SIGMOID = [
    "model.flavour=llama",
    "model.num_kv_heads=2",
    *ROUTED,
    "model.moe.router=sigmoid",
    "model.moe.bias_update_rate=0.01",  # large: the bias moves the routing within 3 steps
    "model.moe.z_loss_coeff=0.1",
]
GPT2 = ["model.flavour=gpt2", *ROUTED, *SOFTMAX]
CP2, EP2, RING = ["parallel.context=2"], ["parallel.expert=2"], ["parallel.context_attention=ring"]
TP2_SP = ["parallel.tensor=2", "parallel.sequence_parallel=true"]
GROUPED = ["model.moe.grouped_mm=true"]
CAPACITY = ["model.moe.capacity_factor=1.0"]  # drops in every step (checked below)

# name -> (the reference's overrides, the layout's); one spawn of ranks per world size.
LAYOUTS_2 = {
    "cp2_softmax": (LLAMA, CP2),
    "cp2_softmax_ring": (LLAMA, [*CP2, *RING]),
    "cp2_sigmoid_bias_update": (SIGMOID, CP2),
    "cp2_sigmoid_grouped_mm_ring": (SIGMOID + GROUPED, [*CP2, *RING]),
    "cp2_gpt2_ring": (GPT2, [*CP2, *RING]),
    "cp2_sigmoid_capacity": (SIGMOID + CAPACITY, CP2),
    "gpt2_ep2": (GPT2, EP2),
    "gpt2_ep2_grouped_mm": (GPT2 + GROUPED, EP2),
}
LAYOUTS_4 = {
    "cp2_ep2": (LLAMA, [*CP2, *EP2]),
    "cp2_ep2_sigmoid_ring": (SIGMOID, [*CP2, *EP2, *RING]),
    "cp2_tp2_sp": (LLAMA, [*CP2, *TP2_SP]),
    "cp2_tp2_sp_capacity": (LLAMA + CAPACITY, [*CP2, *TP2_SP]),
    "cp2_ep2_sigmoid_capacity_grouped_mm": (SIGMOID + CAPACITY + GROUPED, [*CP2, *EP2]),
    "cp2_pp2": (SIGMOID, [*CP2, "parallel.pipeline=2"]),
    "gpt2_ep2_tp2": (GPT2, [*EP2, "parallel.tensor=2"]),
    "gpt2_ep2_tp2_sp_grouped_mm": (GPT2 + GROUPED, [*EP2, *TP2_SP]),
}


def _train(overrides: list[str]) -> dict:
    trainer = build_trainer(make_config(overrides), 3)
    return {
        **moe_figures(trainer, [trainer.step(step) for step in (1, 2, 3)]),
        "tp_rank": trainer.topo.tp_rank,
        # gpt2: the experts' output biases, which only TP rank 0 adds to the output and every TP
        # rank must keep equal (a replicated weight; its gradient the full one on every rank)
        "output_biases": _output_biases(trainer),
    }


def _output_biases(trainer) -> dict:
    named = (item for chunk in trainer.chunks for item in chunk.named_parameters())
    return {n: p.detach().clone() for n, p in named if ".experts." in n and n.endswith("fc2.bias")}


def _layouts_worker(layouts: dict) -> dict:
    return {name: _train(reference + layout) for name, (reference, layout) in layouts.items()}


_references: dict = {}


def _reference(overrides: list[str]) -> dict:
    key = tuple(overrides)
    if key not in _references:
        _references[key] = _train(overrides)
    return _references[key]


@pytest.mark.parametrize("world, layouts", [(2, LAYOUTS_2), (4, LAYOUTS_4)], ids=["world2", "world4"])
def test_layouts_train_like_one_process(world, layouts):
    per_rank = run_ranks(world, _layouts_worker, layouts)
    deviations = {}
    for name, (reference, _) in layouts.items():
        (got,) = [r[name] for r in per_rank if r[name]["logging"]]
        ref = _reference(reference)
        assert got["loss"] == pytest.approx(ref["loss"], abs=TOL, rel=0), name
        assert got["grad_norm"][0] == pytest.approx(ref["grad_norm"][0], abs=TOL, rel=0), name
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=NORM_TOL), name
        assert got["tokens"] == ref["tokens"] and got["dropped"] == ref["dropped"], name
        if "capacity" in name:
            assert all(d > 0 for d in ref["dropped"]), name  # the capacity bites
        assert got["aux"] == pytest.approx(ref["aux"], abs=TOL, rel=0), name
        assert got["z"] == pytest.approx(ref["z"], abs=TOL, rel=0), name
        assert ref["loss"][0] != ref["loss"][-1]
        for rank in range(1, world):  # TP is the fastest-varying grid axis: rank - 1 is its TP rank 0
            if per_rank[rank][name]["tp_rank"] == 1:
                biases, first = per_rank[rank][name]["output_biases"], per_rank[rank - 1][name]["output_biases"]
                assert biases.keys() == first.keys() and all(torch.equal(biases[n], first[n]) for n in biases), name
        if reference[0] == "model.flavour=gpt2":
            assert got["output_biases"], name
        deviations[name] = tuple(
            max(abs(a - b) for a, b in zip(got[key], ref[key])) for key in ("loss", "grad_norm", "aux", "z")
        )
    print("largest |loss|, |grad norm|, |aux|, |z| - reference per layout:", deviations)


def test_sigmoid_bias_update_changes_the_routing():
    """The reference the sigmoid layouts match does move its biases: without the update (rate 0)
    the third step's tokens per expert differ."""
    updated = _reference(SIGMOID)
    still = _reference([*SIGMOID, "model.moe.bias_update_rate=0.0"])
    assert updated["tokens"][0] == still["tokens"][0]
    assert updated["tokens"][2] != still["tokens"][2]


# -- NCCL's rules -----------------------------------------------------------------------------


def _step_trace_worker(overrides: list[str]) -> str:
    from pretrain.parallel.nccl_rules import CommRecorder, dump_trace

    with CommRecorder() as rec:
        trainer = build_trainer(make_config(overrides), 2)
        for step in (1, 2):
            trainer.step(step)
    return dump_trace(rec.events)


def test_a_training_step_at_cp2_ep2_follows_nccl_rules():
    """CP 2 x EP 2 (world 4) with ring attention: the ring's transfers, the tokens-per-expert
    all-reduces over the CP groups, the all-to-alls over the EP groups and the gradient buckets
    are issued alike by every member of each group."""
    from pretrain.parallel.nccl_rules import check_nccl_rules, load_trace

    traces = dict(enumerate(map(load_trace, run_ranks(4, _step_trace_worker, [*LLAMA, *CP2, *EP2, *RING]))))
    summary = check_nccl_rules(traces)
    assert summary["collectives"] > 0 and summary["p2p"] > 0
    ops = [op for e in traces[0] for op in e.ops if e.kind == "post"]
    # Per rank: 4 MoE layers x 2 steps x 2 micro-batches, one all-reduce of the 4 experts' counts
    # over the CP group (ranks 0 and 1) in each forward; 5 all-to-alls each (forward: counts, rows
    # there, rows back; backward: the rows' exchanges reversed) over the EP group (ranks 0 and 2)
    counts = [op for op in ops if op.name == "all_reduce" and op.ranks == (0, 1) and op.nbytes == 4 * 8]
    exchanges = [op for op in ops if op.name == "all_to_all_single"]
    assert len(counts) == 4 * 2 * 2 and {op.ranks for op in exchanges} == {(0, 2)}, summary
    assert len(exchanges) == 4 * 2 * 2 * 5, summary
