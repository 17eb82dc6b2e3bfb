"""The pipeline executor and the training step against a model of NCCL's rules.

Real gloo ranks run the real executor while pretrain.parallel.nccl_rules.CommRecorder records
what each one issues; check_nccl_rules then replays all ranks' traces under NCCL's semantics
(per-pair ordered streams, tags ignored, sends that complete only when their receive runs,
batched groups, collectives in the same order on every rank). gloo itself completes all of
these runs, so only the model can tell a schedule that would hang on GPUs.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from parallel_harness import build_trainer, make_config, run_ranks

from pretrain.parallel.nccl_rules import (
    CommRecorder,
    Event,
    NcclRuleViolation,
    Op,
    check_nccl_rules,
    dump_trace,
    load_trace,
)

# -- the checker on hand-written traces --------------------------------------------------------------


def send(peer, nbytes=40):
    return Op(kind="send", nbytes=nbytes, dtype="float32", peer=peer)


def recv(peer, nbytes=40):
    return Op(kind="recv", nbytes=nbytes, dtype="float32", peer=peer)


def post(unit, *ops):
    return Event("post", unit=unit, ops=ops)


def wait(unit):
    return Event("wait", unit=unit)


def all_reduce(unit, group="1", ranks=(0, 1), nbytes=8):
    return post(
        unit,
        Op(
            kind="collective", name="all_reduce", nbytes=nbytes, dtype="float32", group=group, ranks=ranks, reduce="SUM"
        ),
    )


def test_lone_sends_ahead_of_receives_deadlock():
    # Each rank sends first, then waits for the other's message: fine on gloo, a hang on NCCL.
    traces = {
        0: [post(1, send(1)), post(2, recv(1)), wait(2), wait(1)],
        1: [post(1, send(0)), post(2, recv(0)), wait(2), wait(1)],
    }
    with pytest.raises(NcclRuleViolation, match="(?s)deadlock.*rank 0 waits for \\[recv <- rank 1"):
        check_nccl_rules(traces)


def test_a_batched_exchange_completes():
    traces = {r: [post(1, send(1 - r), recv(1 - r)), wait(1)] for r in (0, 1)}
    assert check_nccl_rules(traces) == {"units": 2, "p2p": 2, "collectives": 0}


def test_matching_ignores_tags_and_checks_sizes():
    # The first send (40 B) meets the first receive, posted for an 80-byte message.
    traces = {
        0: [post(1, send(1, 40)), post(2, send(1, 80)), wait(1), wait(2)],
        1: [post(1, recv(0, 80)), post(2, recv(0, 40)), wait(1), wait(2)],
    }
    with pytest.raises(NcclRuleViolation, match="send #1 from rank 0 to rank 1 .*40 B.* 80 B"):
        check_nccl_rules(traces)


def test_a_send_waits_behind_earlier_operations_on_its_pair():
    # Rank 1 receives in the order sent, but only after a receive from rank 0 that rank 0 posts
    # after waiting for its own second send: the stream order makes this a cycle.
    traces = {
        0: [post(1, send(1)), post(2, send(1)), wait(2), post(3, recv(1)), wait(3)],
        1: [post(1, recv(0)), wait(1), post(2, send(0)), wait(2), post(3, recv(0)), wait(3)],
    }
    with pytest.raises(NcclRuleViolation, match="deadlock"):
        check_nccl_rules(traces)


def test_collectives_must_come_in_the_same_order():
    ok = {r: [all_reduce(1), wait(1), all_reduce(2, nbytes=4), wait(2)] for r in (0, 1)}
    check_nccl_rules(ok)
    swapped = {0: ok[0], 1: [all_reduce(1, nbytes=4), wait(1), all_reduce(2), wait(2)]}
    with pytest.raises(NcclRuleViolation, match="collective #1 on group 1 .* differs"):
        check_nccl_rules(swapped)


def test_a_collective_blocks_until_every_member_joins():
    # Rank 1 waits for a message from rank 0 before the all-reduce; rank 0 sends it only after.
    traces = {
        0: [all_reduce(1), wait(1), post(2, send(1)), wait(2)],
        1: [post(1, recv(0)), wait(1), all_reduce(2), wait(2)],
    }
    with pytest.raises(NcclRuleViolation, match="deadlock"):
        check_nccl_rules(traces)


def test_unmatched_send_and_group_order():
    with pytest.raises(NcclRuleViolation, match="never matched"):
        check_nccl_rules({0: [post(1, send(1))], 1: []})
    groups = {
        0: [Event("new_group", ranks=(0, 1)), Event("new_group", ranks=(0,))],
        1: [Event("new_group", ranks=(0,)), Event("new_group", ranks=(0, 1))],
    }
    with pytest.raises(NcclRuleViolation, match="same order"):
        check_nccl_rules(groups)


# -- real ranks ------------------------------------------------------------------------------------

TINY = [
    "model.hidden_size=8",
    "model.num_heads=2",
    "model.vocab_size=32",
    "model.seq_length=4",
    "train.micro_batch_size=1",
]


def cases(pp: int) -> list[tuple[int, int]]:
    """(virtual stages, micro-batches) for one pipeline size: 1F1B at 1-16 micro-batches,
    interleaved at 2-4 virtual stages and every multiple of pp up to 16."""
    return [(1, m) for m in range(1, 17)] + [(vp, m) for vp in (2, 3, 4) for m in range(pp, 17, pp)]


def _batches(micro: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(micro):
        sample = torch.randint(0, 32, (1, 5), generator=g)
        yield {"tokens": sample[:, :-1], "labels": sample[:, 1:]}


LONE_SEND_CASES = [(1, 1), (1, 2), (1, 5), (2, 2), (3, 4), (4, 6)]


def _lone_send_executor(ops, topo, shape):
    """The transfers of the executor before batching: a lone isend after each operation and a
    blocking recv before the next one needs data (tags kept, as it had them)."""
    pp, last, sends = topo.pp, topo.pp * topo.virtual_stages - 1, []
    for op in ops:
        v = op.chunk * pp + topo.pp_rank
        if op.kind == "F" and v > 0:
            dist.recv(torch.empty(shape), src=topo.pp_peer(-1), tag=v * 100 + op.micro)
        if op.kind == "B" and v < last:
            dist.recv(torch.empty(shape), src=topo.pp_peer(1), tag=10**6 + v * 100 + op.micro)
        if op.kind == "F" and v < last:
            sends.append(dist.isend(torch.zeros(shape), dst=topo.pp_peer(1), tag=(v + 1) * 100 + op.micro))
        if op.kind == "B" and v > 0:
            sends.append(dist.isend(torch.zeros(shape), dst=topo.pp_peer(-1), tag=10**6 + (v - 1) * 100 + op.micro))
    for work in sends:
        work.wait()


def _schedule_worker(pp: int, which: str) -> dict[str, str]:
    """Run every case's step (and its forward-only evaluation); case -> this rank's trace."""
    from pretrain.parallel.bootstrap import build_topology
    from pretrain.parallel.model_chunks import build_model_chunks
    from pretrain.parallel.pipeline import flatten, forward_backward, make_schedule

    dist.init_process_group("gloo")
    traces = {}
    for vp in (1, 2, 3, 4):
        topo = build_topology(tp=1, pp=pp, dp=1, virtual_stages=vp)
        config = make_config(TINY + [f"model.num_layers={pp * vp}"])
        chunks = build_model_chunks(config.model, topo, init_seed=0)
        shape = (1, 4, 8)
        for case_vp, micro in LONE_SEND_CASES if which == "lone_sends" else cases(pp):
            if case_vp != vp:
                continue
            for forward_only in (False, True):
                with CommRecorder() as rec:
                    if which == "lone_sends":
                        _lone_send_executor(flatten(make_schedule(topo, micro, forward_only=forward_only)), topo, shape)
                    else:
                        with torch.set_grad_enabled(not forward_only):
                            forward_backward(
                                chunks=chunks,
                                topo=topo,
                                batches=_batches(micro, 0),
                                micro_batches=micro,
                                autocast=lambda: torch.autocast("cpu", enabled=False),
                                hidden_shape=shape,
                                forward_only=forward_only,
                            )
                traces[f"{vp}/{micro}/{int(forward_only)}"] = dump_trace(rec.events)
    return traces


def run_schedules(pp: int, which: str = "executor") -> dict[str, dict[int, list[Event]]]:
    """case -> rank -> trace, from `pp` gloo ranks."""
    per_rank = run_ranks(pp, _schedule_worker, pp, which)
    return {case: {r: load_trace(per_rank[r][case]) for r in range(pp)} for case in per_rank[0]}


@pytest.mark.parametrize("pp", range(2, 9))
def test_every_schedule_is_deadlock_free_under_nccl_rules(pp):
    traces = run_schedules(pp)
    assert len(traces) == 2 * len(cases(pp))
    for case, by_rank in traces.items():
        vp, micro, forward_only = map(int, case.split("/"))
        summary = check_nccl_rules(by_rank)  # raises with the stuck ranks on a deadlock
        # Every stage boundary carries one activation (and in training one gradient) per micro-batch.
        boundaries = pp * vp - 1
        assert summary["p2p"] == boundaries * micro * (1 if forward_only else 2), case
        assert summary["collectives"] == 0, case
        wire = [op for e in by_rank[0] for op in e.ops]
        assert all(op.nbytes == 4 * 8 * 4 and op.dtype == "float32" for op in wire), case


# -- the zero-bubble schedules (pretrain/parallel/zero_bubble.py) ------------------------------------------

ZERO_BUBBLE = {"zb-h1": 1, "zb-v": 2}  # schedule -> chunks per rank


def _zero_bubble_worker(pp: int, micro_batches: list[int]) -> dict[str, str]:
    """Every zero-bubble case's step (and its evaluation) through the real executor with the
    real split layers; case -> this rank's trace."""
    from pretrain.parallel.bootstrap import build_topology
    from pretrain.parallel.model_chunks import build_model_chunks
    from pretrain.parallel.pipeline import forward_backward

    dist.init_process_group("gloo")
    traces = {}
    for schedule, vp in ZERO_BUBBLE.items():
        topo = build_topology(tp=1, pp=pp, dp=1, virtual_stages=vp, pipeline_schedule=schedule)
        config = make_config(TINY + [f"model.num_layers={pp * vp}", "model.tie_embeddings=false"])
        chunks = build_model_chunks(config.model, topo, init_seed=0)
        for micro in micro_batches:
            for forward_only in (False, True):
                with CommRecorder() as rec, torch.set_grad_enabled(not forward_only):
                    forward_backward(
                        chunks=chunks,
                        topo=topo,
                        batches=_batches(micro, 0),
                        micro_batches=micro,
                        autocast=lambda: torch.autocast("cpu", enabled=False),
                        hidden_shape=(1, 4, 8),
                        forward_only=forward_only,
                    )
                traces[f"{schedule}/{micro}/{int(forward_only)}"] = dump_trace(rec.events)
    return traces


@pytest.mark.parametrize("pp", [2, 3, 4])
def test_zero_bubble_schedules_are_deadlock_free_under_nccl_rules(pp):
    """ZB-H1 and ZB-V on real ranks, with their W's, early receives and (ZB-V) the V's turn on
    the last rank, which moves its activation and gradient without a transfer."""
    micro_batches = list(range(1, 2 * pp + 3))
    per_rank = run_ranks(pp, _zero_bubble_worker, pp, micro_batches)
    assert len(per_rank[0]) == 2 * 2 * len(micro_batches)
    for case in per_rank[0]:
        schedule, micro, forward_only = case.split("/")
        summary = check_nccl_rules({r: load_trace(per_rank[r][case]) for r in range(pp)})
        boundaries = pp * ZERO_BUBBLE[schedule] - 1 - (schedule == "zb-v")  # the turn is local
        assert summary["p2p"] == boundaries * int(micro) * (1 if forward_only == "1" else 2), case
        assert summary["collectives"] == 0, case


def _replayed(steps: list[list], pp: int, v_shape: bool) -> dict[int, list[Event]]:
    """The transfers the executor issues for every rank's zero-bubble steps: before each step
    the previous step's sends and the step's receives (its RF/RB ops, in order) as one group."""
    from pretrain.parallel.zero_bubble import stage_owner

    stages = 2 * pp if v_shape else pp
    traces = {}
    for r in range(pp):
        events, sends = [], []
        for unit, step in enumerate([*steps[r], ()], start=1):
            receives = []
            for kind, chunk, _ in step:
                stage = 2 * pp - 1 - r if chunk == 1 else r
                if kind in ("RF", "RB"):
                    source = stage_owner(stage - 1 if kind == "RF" else stage + 1, pp=pp, v_shape=v_shape)[0]
                    receives.append(Op(kind="recv", nbytes=128, dtype="float32", peer=source))
            if sends or receives:
                events += [post(unit, *sends, *receives), wait(unit)]
            sends = []
            for kind, chunk, _ in step:
                stage = 2 * pp - 1 - r if chunk == 1 else r
                target = stage + 1 if kind == "F" else stage - 1
                if kind in ("F", "B") and 0 <= target < stages:
                    peer = stage_owner(target, pp=pp, v_shape=v_shape)[0]
                    if peer != r:
                        sends.append(Op(kind="send", nbytes=128, dtype="float32", peer=peer))
        traces[r] = events
    return traces


def test_zero_bubble_schedules_up_to_8_stages_replayed_under_nccl_rules():
    """Every ZB-H1 and ZB-V schedule of 2-8 stages and 1-16 micro-batches (and ZB-V's
    evaluation) through the model, from the schedules alone (the real executor: above)."""
    from pretrain.parallel.zero_bubble import simulate

    for pp in range(2, 9):
        for micro in range(1, 17):
            for v_shape, forward_only in ((False, False), (True, False), (True, True)):
                steps = simulate(pp=pp, micro_batches=micro, v_shape=v_shape, forward_only=forward_only)
                check_nccl_rules(_replayed(steps, pp, v_shape))


def test_the_model_catches_the_old_lone_send_executor():
    traces = run_schedules(2, which="lone_sends")
    verdicts = {}
    for case, by_rank in traces.items():
        try:
            check_nccl_rules(by_rank)
            verdicts[case] = "ok"
        except NcclRuleViolation as e:
            verdicts[case] = "deadlock" if "deadlock" in str(e) else str(e)
    # gloo ran every case to the end; under NCCL every training step of 2+ micro-batches hangs.
    training = {case: v for case, v in verdicts.items() if case.endswith("/0")}
    assert training == {
        "1/1/0": "ok",
        "1/2/0": "deadlock",
        "1/5/0": "deadlock",
        "2/2/0": "deadlock",
        "3/4/0": "deadlock",
        "4/6/0": "deadlock",
    }, verdicts


# -- a whole training step: collectives of TP, SP, DP buckets, tied embeddings and ZeRO ------------------


def _step_worker(overrides: list[str]) -> str:
    """Two training steps on this rank's part of the grid; the trace of what it issued."""
    config = make_config(overrides)
    with CommRecorder() as rec:
        trainer = build_trainer(config, 2)
        for step in (1, 2):
            trainer.step(step)
    return dump_trace(rec.events)


# Small buckets (parallel.bucket_mb=0.01): many DP reductions start inside the backward passes of
# an interleaved schedule, from our hooks (plain DP) or DeepSpeed's buckets driven by ours
# (pretrain/parallel/zero_grads.py), next to the sequence-parallel TP sums and the tied
# embedding's sum. Their losses against single-process runs are in test_parallel/test_zero.
@pytest.mark.parametrize(
    "overrides, world",
    [
        (
            [
                "parallel.tensor=2",
                "parallel.pipeline=2",
                "parallel.sequence_parallel=true",
                "parallel.virtual_stages=2",
                "parallel.bucket_mb=0.01",
            ],
            8,
        ),
        (
            [
                "parallel.tensor=2",
                "parallel.pipeline=2",
                "parallel.virtual_stages=2",
                "parallel.sequence_parallel=true",
                "parallel.zero_stage=1",
                "parallel.bucket_mb=0.01",
            ],
            8,
        ),
        (
            [
                "model.flavour=llama",
                "model.num_kv_heads=2",
                "parallel.pipeline=2",
                "parallel.virtual_stages=2",
                "parallel.zero_stage=2",
                "parallel.bucket_mb=0.01",
            ],
            4,
        ),
        (["parallel.pipeline=2", "train.precision=bf16"], 2),
        # Context parallelism's ring (K/V blocks and their gradients passed rank to rank inside
        # every layer's forward and backward) between the pipeline's exchanges, with DP buckets
        # reducing over data x context ranks during the backward.
        (
            [
                "model.flavour=llama",
                "model.num_kv_heads=2",
                "parallel.context=2",
                "parallel.context_attention=ring",
                "parallel.pipeline=2",
                "parallel.virtual_stages=2",
                "parallel.bucket_mb=0.01",
            ],
            4,
        ),
        (
            [
                "parallel.context=2",
                "parallel.context_attention=ring",
                "parallel.zero_stage=1",
                "parallel.bucket_mb=0.01",
            ],
            4,
        ),
        # Zero-bubble: DP buckets reduced from the W passes (run while a step's transfers are in
        # flight), SP's TP sums, and ZeRO-1's hand-on from the W's.
        (
            [
                "model.flavour=llama",
                "model.num_kv_heads=2",
                "parallel.tensor=2",
                "parallel.pipeline=2",
                "parallel.sequence_parallel=true",
                "parallel.pipeline_schedule=zb-v",
                "parallel.bucket_mb=0.01",
            ],
            8,
        ),
        (
            [
                "parallel.pipeline=2",
                "parallel.pipeline_schedule=zb-h1",
                "parallel.zero_stage=1",
                "parallel.bucket_mb=0.01",
            ],
            4,
        ),
        # gpt2's tied embedding under zb-v: both copies on pipeline rank 0, summed there (no
        # collective of their own), then handed to ZeRO-1's last bucket like any gradient.
        (
            [
                "parallel.pipeline=2",
                "parallel.pipeline_schedule=zb-v",
                "parallel.zero_stage=1",
                "parallel.bucket_mb=0.01",
            ],
            4,
        ),
        # Expert parallelism: each MoE layer's two all-to-alls (counts, then rows) in the forward,
        # the rows' reverse all-to-all in the backward, inside an interleaved schedule, with the
        # non-expert DP buckets reducing during the backward (the experts' have no other holder).
        (
            [
                "model.flavour=llama",
                "model.num_kv_heads=2",
                "model.moe.num_experts=4",
                "model.moe.ffn_hidden_size=32",
                "parallel.expert=2",
                "parallel.pipeline=2",
                "parallel.virtual_stages=2",
                "parallel.bucket_mb=0.01",
            ],
            4,
        ),
    ],
    ids=[
        "tp2_pp2_dp2_sp_interleaved",
        "zero1_tp2_pp2_dp2_sp_tied",
        "zero2_pp2_dp2",
        "pp2_bf16",
        "cp2_ring_pp2_interleaved",
        "cp2_ring_dp2_zero1",
        "zbv_tp2_pp2_dp2_sp",
        "zbh1_zero1_pp2_dp2_tied",
        "zbv_zero1_pp2_dp2_tied",
        "ep2_pp2_interleaved_dp2",
    ],
)
def test_a_training_step_follows_nccl_rules(overrides, world):
    traces = dict(enumerate(map(load_trace, run_ranks(world, _step_worker, overrides))))
    summary = check_nccl_rules(traces)
    assert summary["p2p"] > 0 and summary["collectives"] > 0
    wire = {op.dtype for events in traces.values() for e in events for op in e.ops if op.kind != "collective"}
    # Activations and their gradients travel in the compute dtype: bf16 halves the bytes.
    assert wire == ({"bfloat16"} if "train.precision=bf16" in overrides else {"float32"})
