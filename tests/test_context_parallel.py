"""Context parallelism (parallel.context): each sequence split over ranks in load-balanced chunks,
attention across them by all-gather or ring, composed with TP (+SP), PP, DP and ZeRO-1.

- The attention itself, in float64 on real gloo ranks, against one device's attention on the
  whole sequence: output and the gradients of q, k, v equal to 1e-12 for both variants (the ring
  with its math block kernel, tiled or not, and with torch's fused CPU kernel, its default in
  fp32 and bf16), causal or not, with and without documents, grouped-query attention, CP = 2, 4.
- Training, fp32, 3 optimizer steps (warmup, clipping, AdamW) on the harness's batches: losses
  and gradient norms equal the single-process run's, for CP 2 and 4, with TP + SP, PP (1F1B and
  interleaved), DP, ZeRO 1-3, activation checkpointing (full and selective) and documents.
  Several layouts share one spawn of ranks (each builds its own groups over the same default
  group), so the file stays quick.
- Validation before any process group, checkpoints that do not depend on CP (saved at CP 2,
  resumed at CP 1 and at CP 4), and the ring's transfers under the NCCL-rules model (also in
  tests/test_nccl_rules.py's step test).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from parallel_harness import build_trainer, make_config, run_job, run_layout, run_ranks

from pretrain.config import ConfigError, validate_layout
from pretrain.parallel.topology import grid_position

LLAMA = ["model.flavour=llama", "model.num_kv_heads=2"]
DOCUMENTS = ["data.document_attention_mask=true", "data.tokenizer=unused"]
RING = ["parallel.context_attention=ring"]
# As tests/test_parallel.py: 2e-5 absolute on the loss, 1e-4 relative on the gradient norm. The
# attention is exact (float64 test below); in fp32 its sums run in another order than one
# device's SDPA, and AdamW's first steps (update ~ g / |g| per element) magnify the rounding of
# near-zero gradient entries: measured up to 2.7e-5 on the third step's norm (documents, ring),
# while the first step's norm, before any update, agrees exactly there (0.0). One process moves
# as much (2.2e-5) between two of torch's SDPA kernels; whole training in float64 equals one
# process within 1e-12 (tests/test_float64_exact.py).
LOSS_TOL = 2e-5
NORM_TOL = 1e-4
FIRST_NORM_TOL = 2e-5

# -- validation and the grid (no processes) ------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.context=4", "model.seq_length=36"], 4, "36 is not a multiple of 2 x parallel.context = 8"),
        (["parallel.context=3"], 3, "32 is not a multiple of 2 x parallel.context = 6"),
        (["parallel.context=2"], 3, "world size 3 is not divisible by .* x parallel.context = 1 x 1 x 2 = 2"),
        (
            ["parallel.context=2", "parallel.tensor=4", "parallel.sequence_parallel=true", "model.seq_length=12"],
            8,
            "6 tokens .* not divisible by parallel.tensor=4",
        ),
        (["parallel.context=2", *RING, "model.dropout=0.1"], 2, "no attention dropout"),
        (["parallel.context_attention=rings"], 1, "must be one of all_gather, ring"),
        (["parallel.context=0"], 1, "parallel.context: must be >= 1"),
    ],
)
def test_bad_context_layouts_are_refused_before_any_process_group(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        validate_layout(make_config(overrides), world)


def test_flash_attn_backend_takes_the_ring_and_refuses_all_gather():
    flash = ["parallel.context=2", "model.attention_backend=flash_attn", "train.precision=bf16"]
    with pytest.raises(ConfigError, match="model.attention_backend: flash_attn with parallel.context > 1 and "):
        make_config(flash)
    config = make_config([*flash, *RING])
    assert (config.model.attention_backend, config.parallel.context_attention) == ("flash_attn", "ring")


def test_rank_order_is_tp_cp_dp_pp():
    """rank = ((pp * dp + dp_rank) * cp + cp_rank) * tp + tp_rank, and the data x context ranks of
    a TP/PP position are its replicas."""
    tp, cp, dp, pp = 2, 2, 2, 2
    seen = set()
    for rank in range(tp * cp * dp * pp):
        t = grid_position(rank=rank, tp=tp, cp=cp, dp=dp, pp=pp)
        coords = (t.tp_rank, t.cp_rank, t.dp_rank, t.pp_rank)
        assert rank == t.global_rank(tp_rank=coords[0], cp_rank=coords[1], dp_rank=coords[2], pp_rank=coords[3])
        assert t.replica_rank == t.dp_rank * cp + t.cp_rank and t.replicas == 4
        seen.add(coords)
    assert len(seen) == 16
    t = grid_position(rank=5, tp=tp, cp=cp, dp=dp, pp=pp)  # tp 1, cp 0, dp 1, pp 0
    assert (t.tp_rank, t.cp_rank, t.dp_rank, t.pp_rank) == (1, 0, 1, 0)
    assert (t.cp_peer(1), t.cp_peer(-1), t.pp_peer(1)) == (7, 7, 13)


# -- the attention, float64, against one device ---------------------------------------------------


def _attention_worker() -> dict:
    """On 4 ranks: CP = 4, and CP = 2 x DP = 2; every variant against the whole-sequence
    attention computed on each rank. Returns the largest differences per case."""
    from pretrain.models.attention import attention
    from pretrain.parallel import ring_kernels
    from pretrain.parallel.bootstrap import build_topology
    from pretrain.parallel.context import ContextParallel

    dist.init_process_group("gloo")
    errors = {}
    default_tile = ring_kernels._TILE_SCORES
    for cp, dp in ((4, 1), (2, 2)):
        # "ring": the block kernel float64 picks (math); "ring_tiled": math with the blocks' query
        # rows in tiles of 3 rows (2 x 4 heads x 3 rows x <= 8 keys); "ring_cpu_flash": torch's
        # fused CPU kernel (CPU's default in fp32 and bf16), which takes float64 too
        for method in ("all_gather", "ring", "ring_tiled", "ring_cpu_flash"):
            ring_kernels._TILE_SCORES = 2 * 4 * 3 * 8 if method == "ring_tiled" else default_tile
            variant = "all_gather" if method == "all_gather" else "ring"
            topo = build_topology(tp=1, pp=1, dp=dp, cp=cp, context_attention=variant)
            ctx = ContextParallel(topo, block_kernel="cpu_flash" if method == "ring_cpu_flash" else "auto")
            for causal in (True, False):
                for documents in (False, True):
                    mask = f"{'causal' if causal else 'bidirectional'}/{'docs' if documents else 'plain'}"
                    errors[f"cp{cp}/{method}/{mask}"] = _compare_attention(
                        ctx, attention, causal=causal, documents=documents, seed=topo.dp_rank
                    )
    return errors


def _compare_attention(ctx, attention, *, causal: bool, documents: bool, seed: int) -> float:
    b, heads, kv_heads, s, d = 2, 4, 2, 32, 8
    g = torch.Generator().manual_seed(100 + seed)
    q, k, v, dout = (
        torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads, heads)
    )
    segments = None
    if documents:  # documents that cross chunk boundaries, and a one-token document
        ends = torch.zeros(b, s, dtype=torch.long)
        ends[0, [2, 3, 13, 20]] = 1
        ends[1, [7, 8, 25]] = 1
        segments = ends.cumsum(1) - ends
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention(*full, causal=causal, segments=segments)
    ref.backward(dout)
    local = [ctx.local(t.transpose(1, 2)).transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    prepared = ctx.prepare(segments, seq_len=s, causal=causal, device=q.device)
    out = ctx.attention(*local, prepared)
    out.backward(ctx.local(dout.transpose(1, 2)).transpose(1, 2))
    pairs = [(out, ref)] + [(mine.grad, whole.grad) for mine, whole in zip(local, full)]
    return max(
        float((a.detach() - ctx.local(r.detach().transpose(1, 2)).transpose(1, 2)).abs().max()) for a, r in pairs
    )


def test_attention_equals_one_device_in_float64():
    per_rank = run_ranks(4, _attention_worker)
    for rank, errors in enumerate(per_rank):
        assert len(errors) == 32
        for case, error in errors.items():
            assert error < 1e-12, (rank, case, error)


# -- training: every layout equals the single-process run -----------------------------------------

# name -> (the reference's overrides, the layout's); grouped by world size, one spawn per group.
LAYOUTS_2 = {
    "cp2": (LLAMA, ["parallel.context=2"]),
    "cp2_ring": (LLAMA, ["parallel.context=2", *RING]),
    "cp2_gpt2_ring": ([], ["parallel.context=2", *RING]),
    "cp2_documents": (LLAMA + DOCUMENTS, ["parallel.context=2"]),
    "cp2_documents_ring": (LLAMA + DOCUMENTS, ["parallel.context=2", *RING]),
    "cp2_zero2": (LLAMA, ["parallel.context=2", "parallel.zero_stage=2"]),
    "cp2_selective_checkpointing_ring": (
        LLAMA,
        ["parallel.context=2", "model.activation_checkpointing=selective", *RING],
    ),
}
TP2_SP = ["parallel.tensor=2", "parallel.sequence_parallel=true"]
LAYOUTS_4 = {
    "cp4": (LLAMA, ["parallel.context=4"]),
    "cp4_ring": (LLAMA, ["parallel.context=4", *RING]),
    "cp2_tp2_sp": (LLAMA, ["parallel.context=2", *TP2_SP]),
    "cp2_tp2_sp_ring_gpt2": ([], ["parallel.context=2", *TP2_SP, *RING]),
    "cp2_pp2_1f1b_ring": (LLAMA, ["parallel.context=2", "parallel.pipeline=2", *RING]),
    "cp2_pp2_interleaved": (LLAMA, ["parallel.context=2", "parallel.pipeline=2", "parallel.virtual_stages=2"]),
    "cp2_dp2_zero1_ring": (LLAMA, ["parallel.context=2", "parallel.zero_stage=1", *RING, "parallel.bucket_mb=0.01"]),
    "cp2_dp2_zero3_ring": (
        LLAMA,
        ["parallel.context=2", "parallel.zero_stage=3", "parallel.zero3_persistence_threshold=0", *RING],
    ),
    "cp2_dp2_checkpointing": (
        LLAMA,
        ["parallel.context=2", "model.activation_checkpointing=full", "parallel.bucket_mb=0.01"],
    ),
}


def _layouts_worker(layouts: dict) -> dict:
    """Train each layout in turn on this rank; name -> the logging rank's losses and norms."""
    results = {}
    for name, (reference, layout) in layouts.items():
        trainer = build_trainer(make_config(reference + layout), 3)
        records = [trainer.step(step) for step in (1, 2, 3)]
        results[name] = {
            "logging": trainer.topo.is_logging_rank,
            "loss": [r["loss"] for r in records],
            "grad_norm": [r["grad_norm"] for r in records],
        }
    return results


_references: dict = {}


def _reference(overrides: list[str]) -> dict:
    key = tuple(overrides)
    if key not in _references:
        _references[key] = run_layout(overrides, world=1)
    return _references[key]


@pytest.mark.parametrize("world, layouts", [(2, LAYOUTS_2), (4, LAYOUTS_4)], ids=["world2", "world4"])
def test_layouts_train_like_one_process(world, layouts):
    per_rank = run_ranks(world, _layouts_worker, layouts)
    deviations = {}
    for name, (reference, _) in layouts.items():
        (got,) = [r[name] for r in per_rank if r[name]["logging"]]
        ref = _reference(reference)
        assert got["loss"] == pytest.approx(ref["loss"], abs=LOSS_TOL), name
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=NORM_TOL), name
        assert got["grad_norm"][0] == pytest.approx(ref["grad_norm"][0], abs=FIRST_NORM_TOL), name
        deviations[name] = (
            max(abs(a - b) for a, b in zip(got["loss"], ref["loss"])),
            max(abs(a - b) for a, b in zip(got["grad_norm"], ref["grad_norm"])),
        )
        assert ref["loss"][0] != ref["loss"][-1]
    print("largest |loss - reference|, |grad norm - reference| per layout:", deviations)
    if "cp2_documents" in layouts:  # the documents did change what the model computes
        assert _reference(LLAMA + DOCUMENTS)["loss"] != _reference(LLAMA)["loss"]


# -- the ring's transfers under NCCL's rules ------------------------------------------------------


def _ring_trace_worker(naive: bool) -> str:
    """One forward and backward of ring attention at CP = world size (causal, documents),
    recorded; or, `naive`, the same K/V rotation as a lone isend before each receive (what gloo
    runs, and what NCCL would hang on at CP = 2, where both neighbours are one rank)."""
    from pretrain.parallel.bootstrap import build_topology
    from pretrain.parallel.context import ContextParallel
    from pretrain.parallel.nccl_rules import CommRecorder, dump_trace

    dist.init_process_group("gloo")
    cp = dist.get_world_size()
    topo = build_topology(tp=1, pp=1, dp=1, cp=cp, context_attention="ring")
    ctx = ContextParallel(topo)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32 // cp, 4, generator=g).requires_grad_() for _ in range(3))
    segments = (torch.arange(32) // 5)[None]
    with CommRecorder() as rec:
        if naive:
            kv = torch.stack([k, v]).detach()
            for _ in range(cp - 1):
                send = dist.isend(kv, dst=topo.cp_peer(1))
                kv = torch.empty_like(kv)
                dist.recv(kv, src=topo.cp_peer(-1))
                send.wait()
        else:
            out = ctx.attention(q, k, v, ctx.prepare(segments, seq_len=32, causal=True, device=q.device))
            out.sum().backward()
    return dump_trace(rec.events)


def test_ring_transfers_follow_nccl_rules():
    from pretrain.parallel.nccl_rules import NcclRuleViolation, check_nccl_rules, load_trace

    for cp in (2, 4):
        traces = dict(enumerate(map(load_trace, run_ranks(cp, _ring_trace_worker, False))))
        summary = check_nccl_rules(traces)
        # Per rank, forward: cp - 1 hops of K/V; backward: cp - 1 of K/V and cp of dK/dV (the
        # last one home); each hop one batched send + receive.
        hops = cp * (3 * cp - 2)
        assert summary == {"units": hops, "p2p": hops, "collectives": 0}, cp
    naive = dict(enumerate(map(load_trace, run_ranks(2, _ring_trace_worker, True))))
    with pytest.raises(NcclRuleViolation, match="deadlock"):
        check_nccl_rules(naive)  # gloo ran it to the end


# -- checkpoints do not depend on CP ----------------------------------------------------------------


@pytest.mark.parametrize(
    "saved_at, world, resumed_at, resumed_world",
    [
        ([*LLAMA, "parallel.context=2", *RING], 2, LLAMA, 1),
        # ZeRO-1 partitions over data x context (CP 2 x DP 1): resumed over DP 2 at CP 1.
        ([*LLAMA, "parallel.context=2", "parallel.zero_stage=1"], 2, [*LLAMA, "parallel.zero_stage=1"], 2),
        # and at a larger CP: each of 4 ranks holds 2 of 8 chunks instead of 2 of 4
        ([*LLAMA, "parallel.context=2", *RING], 2, [*LLAMA, "parallel.context=4", *RING], 4),
    ],
    ids=["cp2_to_one_process", "cp2_zero1_to_dp2_zero1", "cp2_to_cp4"],
)
def test_checkpoint_saved_at_cp2_resumes_at_another_cp(tmp_path, saved_at, world, resumed_at, resumed_world):
    straight = run_job(saved_at, world=world, last=4, save=str(tmp_path), save_at=2)[0]
    files = sorted(p.name for p in (tmp_path / "step_2").glob("model_*"))
    assert files == ["model_tp0_pp0_part0.safetensors", "model_tp0_pp0_part1.safetensors"]  # one part per CP rank
    resumed = run_job(resumed_at, world=resumed_world, first=3, last=4, resume=str(tmp_path / "step_2"))[0]
    assert resumed["loss"] == pytest.approx(straight["loss"][2:], abs=LOSS_TOL)
    assert resumed["grad_norm"] == pytest.approx(straight["grad_norm"][2:], rel=NORM_TOL)
    assert straight["loss"][3] != straight["loss"][2]
