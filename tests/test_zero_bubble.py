"""Zero-bubble pipeline schedules (parallel.pipeline_schedule = zb-h1 | zb-v).

1. The split backward (pretrain/models/weight_grads.py): for every layer kind, B alone leaves the
   weights' gradients untouched and gives the plain backward's input gradient; B then W gives
   the plain backward's weight gradients, bit for bit in fp32; whole models with activation
   checkpointing included.
2. The schedules (pretrain/parallel/zero_bubble.py): every operation once and in dependency
   order, ZB-H1 in 1F1B's order with the paper's bubble, ZB-V below it; 1F1B's peak memory.
   (Deadlock-freedom under NCCL's rules: tests/test_nccl_rules.py.)
3. Training on real gloo ranks equals the single-process run (loss within 2e-5, gradient norm
   within 1e-4 relative, 3 steps, fp32) for PP 2 and 4 with each schedule, with TP 2 (+SP), DP 2
   (buckets reduced during the W's), ZeRO-1, document masks, activation checkpointing, gpt2's
   tied embeddings, context parallelism and mixture-of-experts layers.
   gpt2's tied embedding under zb-v, whose rank 0 holds both copies (the first stage's input
   embedding, the last stage's output layer): the same at PP 2 and 4, TP 2 (+SP), DP 2 and
   ZeRO-1, with both copies bit-for-bit equal after every run; its checkpoints resume under 1F1B
   and interleaved 1F1B and theirs under zb-v, and it exports to transformers.
4. Bad schedule settings are refused at config validation, naming the key.
"""

from __future__ import annotations

import copy

import pytest
import torch
from parallel_harness import make_config, run_job, run_layout, run_ranks, torchrun
from torch import nn

from pretrain.config import ConfigError
from pretrain.models.gpt import GPT
from pretrain.models.layers import DenseLayers, LayerNorm, RMSNorm
from pretrain.models.weight_grads import SplitLinear, WeightGradStore, split_weight_gradients
from pretrain.parallel import zero_bubble
from pretrain.parallel.pipeline import Op, flatten, make_schedule, one_f_one_b
from pretrain.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelLayers,
    VocabParallelEmbedding,
)
from pretrain.parallel.topology import grid_position

# -- 1. the split backward ----------------------------------------------------------------------------

ONE = grid_position()  # TP size 1: the tensor-parallel layers' own code with no communication


def _randomized(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module.to(dtype)


def _tp_output_layer():
    weight = nn.Parameter(torch.randn(13, 6))
    layers = TensorParallelLayers(ONE)

    class Output(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.layers = weight, layers

        def forward(self, x):
            return self.layers.output_logits(x, self.weight)

    return Output()


def _fused_loss():
    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.layers = nn.Parameter(torch.randn(13, 6)), DenseLayers()
            self.labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))

        def forward(self, x):
            return self.layers.linear_cross_entropy(x, self.weight, self.labels, vocab_size=11)

    return Loss()


# name -> (module factory, input kind): inputs [2, 5, 6] or token ids [2, 5]. fp32, compared bit
# for bit: the split layers run the plain layers' own kernels.
LAYERS = {
    "linear": (lambda: nn.Linear(6, 4), "hidden"),
    "linear_no_bias": (lambda: nn.Linear(6, 4, bias=False), "hidden"),
    "embedding": (lambda: nn.Embedding(11, 6), "ids"),
    "layer_norm": (lambda: LayerNorm(6), "hidden"),
    "rms_norm": (lambda: RMSNorm(6, eps=1e-5), "hidden"),
    "column_parallel": (lambda: ColumnParallelLinear(6, 8, bias=True, stacked=2, topo=ONE), "hidden"),
    # its bias is added after the reduction over TP ranks: the split bias_add
    "row_parallel": (lambda: RowParallelLinear(6, 4, bias=True, topo=ONE), "hidden"),
    "vocab_parallel_embedding": (lambda: VocabParallelEmbedding(11, 6, topo=ONE), "ids"),
    "output_layer": (_tp_output_layer, "hidden"),
    "fused_output_layer_and_loss": (_fused_loss, "hidden"),
}
EXACT = {"rtol": 0, "atol": 0}


def _holder(module: nn.Module) -> nn.Module:
    """split_weight_gradients swaps a model's children: give a bare torch layer a parent."""
    return nn.Sequential(module)


def _grads(model: nn.Module) -> list:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", LAYERS)
def test_b_then_w_equals_the_plain_backward(name):
    build, kind = LAYERS[name]
    dtype = torch.float32
    plain = _holder(_randomized(build(), dtype))
    split = copy.deepcopy(plain)
    store = WeightGradStore()
    split_weight_gradients(split, store)
    if hasattr(split[0], "layers"):  # the output layers' factory defers for them
        split[0].layers.weight_grads = store
    g = torch.Generator().manual_seed(1)
    for micro in range(2):  # the second W adds to the first's gradients, as backwards do
        if kind == "ids":
            x = torch.randint(0, 11, (2, 5), generator=g)
        else:
            x = torch.randn(2, 5, 6, generator=g, dtype=dtype)
        input_grads = []
        for model in (plain, split):
            xi = x if kind == "ids" else x.clone().requires_grad_()
            out = model(xi)
            before = _grads(model)
            probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(micro), dtype=out.dtype)
            (out * probe).sum().backward()
            if model is split:  # B: the input gradient only, the weights' gradients untouched
                assert all(torch.equal(a, b) if a is not None else b is None for a, b in zip(before, _grads(split)))
                assert store.pending() > 0
                store.seal(micro)
                store.run(micro)  # W
                assert store.pending() == 0
            input_grads.append(xi.grad)
        if kind != "ids":
            torch.testing.assert_close(input_grads[1], input_grads[0], **EXACT)
    for (n, p), q in zip(plain.named_parameters(), split.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **EXACT, msg=f"{name}: {n}")


def test_a_w_pass_adds_one_closure_at_a_time_in_b_order():
    """One autograd pass per W: each closure's gradients are computed when the engine reaches it
    and accumulated (hooks fired) before the next closure runs, in the order the B deferred them;
    a parameter in two closures gets their sum, and its hook fires once."""
    store, events = WeightGradStore(), []
    params = [nn.Parameter(torch.zeros(3)) for _ in range(4)]

    def closure(name: str, p: nn.Parameter, value: float):
        def run():
            events.append(f"compute {name}")
            return [(p, torch.full((3,), value))]

        return run

    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda q, i=i: events.append(f"add {i}"))
        store.defer((p,), closure(str(i), p, float(i)))
    store.defer((None, params[0]), closure("0 again", params[0], 1.0))
    store.seal("B")
    store.run("B")
    assert events == [
        "compute 0",
        "compute 1",
        "add 1",
        "compute 2",
        "add 2",
        "compute 3",
        "add 3",
        "compute 0 again",
        "add 0",
    ]
    assert params[0].grad.tolist() == [1.0] * 3 and params[3].grad.tolist() == [3.0] * 3
    assert store.pending() == 0


FLAVOURS = {
    "gpt2": [],  # LayerNorm, biases, learned positions, tied embedding
    "llama": ["model.flavour=llama", "model.num_kv_heads=2"],  # RMSNorm, SwiGLU, untied head
}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_a_whole_model_splits_its_backward_exactly(flavour, recompute):
    """Every layer of both flavours at once (the fused output layer and loss included), under
    activation checkpointing: the recomputed forward's split layers hand the same closures to
    the store. Bit for bit, W's run after both micro-batches' B's."""
    config = make_config(FLAVOURS[flavour] + [f"model.activation_checkpointing={recompute}"]).model
    plain = GPT(config, init_seed=5)
    split = GPT(copy.deepcopy(config), init_seed=5)
    store = WeightGradStore()
    split_weight_gradients(split, store)
    tokens = torch.randint(0, config.vocab_size, (2, 2, config.seq_length), generator=torch.Generator().manual_seed(4))
    for micro, sample in enumerate(tokens):  # two micro-batches: W's accumulate like backwards do
        for model in (plain, split):
            model(sample, labels=sample.roll(-1, 1)).backward()
        assert all(p.grad is None for p in split.parameters())  # only B's so far
        store.seal(micro)
    for micro in range(len(tokens)):
        store.run(micro)
    grads = dict(split.named_parameters())
    for n, p in plain.named_parameters():
        torch.testing.assert_close(grads[n].grad, p.grad, **EXACT, msg=n)


def test_layers_are_plain_without_a_zero_bubble_schedule():
    config = make_config(["parallel.pipeline=2"]).model
    from pretrain.parallel.model_chunks import build_model_chunks

    for schedule, split in (("1f1b", False), ("zb-h1", True)):
        topo = grid_position(pp=2, pipeline_schedule=schedule)
        (chunk,) = build_model_chunks(config, topo, init_seed=1)
        assert any(isinstance(m, SplitLinear) for m in chunk.modules()) == split
        assert (chunk.layers.weight_grads is not None) == split


# -- 2. the schedules -----------------------------------------------------------------------------------


def _check_order(steps: list, chunks: int, micro: int, forward_only: bool = False) -> None:
    ops = flatten(steps)
    done = set()
    for op in ops:
        key = (op.kind, op.chunk, op.micro)
        assert key not in done, f"{key} twice"
        if op.kind == "B":
            assert ("F", op.chunk, op.micro) in done
        if op.kind == "W":
            assert ("B", op.chunk, op.micro) in done
            # W's of a chunk in micro-batch order: its last W is the last to add to its gradients
            assert all(("W", op.chunk, m) in done for m in range(op.micro))
        if op.kind in ("F", "B"):  # a W or receive shares a step with at most one F or B, after them
            step = next(s for s in steps if op in s)
            assert step[-1] == op and sum(o.kind in "FB" for o in step) == 1
        done.add(key)
    kinds = "F" if forward_only else "FBW"
    assert {k for k in done if k[0] in "FBW"} == {(k, c, m) for k in kinds for c in range(chunks) for m in range(micro)}


@pytest.mark.parametrize("pp", range(2, 9))
def test_every_operation_runs_once_in_order(pp):
    for micro in range(1, 17):
        for r in range(pp):
            h1 = make_schedule(grid_position(rank=r, pp=pp, pipeline_schedule="zb-h1"), micro)
            _check_order(h1, 1, micro)
            # ZB-H1 keeps 1F1B's order of forwards and backwards, so its transfers are 1F1B's
            plain = [op for op in flatten(one_f_one_b(pp=pp, pp_rank=r, micro_batches=micro))]
            assert [op for op in flatten(h1) if op.kind in "FB"] == plain
            v = grid_position(rank=r, pp=pp, virtual_stages=2, pipeline_schedule="zb-v")
            _check_order(make_schedule(v, micro), 2, micro)
            _check_order(make_schedule(v, micro, forward_only=True), 2, micro, forward_only=True)


@pytest.mark.parametrize("pp", range(2, 9))
def test_bubbles_and_memory_of_the_schedules(pp):
    """In the simulation's own costs (F : B : W = 4 : 4 : 3 ticks): 1F1B idles (p-1)(F+B+W) and
    interleaving halves that; ZB-H1 idles the paper's (p-1)(F+B-W), ZB-V less still."""
    f, b, w = (zero_bubble.COSTS[k] for k in "FBW")
    for micro in range(pp, 4 * pp + 1):
        h1 = zero_bubble.figures(pp=pp, micro_batches=micro, v_shape=False)
        v = zero_bubble.figures(pp=pp, micro_batches=micro, v_shape=True)
        assert h1["makespan"] - h1["work"] == (pp - 1) * (f + b - w), (pp, micro)
        # ZB-V's operations are half a stage long: its bubble in whole-stage ticks
        v_bubble = (v["makespan"] - v["work"]) / 2
        assert v_bubble < (pp - 1) * (f + b - w) < (pp - 1) * (f + b + w) / 2, (pp, micro, v)
        # Held micro-batches (forward done, W not yet): 1F1B's first rank holds p, at most.
        assert h1["peak"] == [pp] * pp
        assert v["peak"] == [2 * pp] * pp  # half-stage micro-batches: p stages' worth


def test_receives_come_in_the_senders_order():
    """Every remote input is received once, before its operation, and each neighbour's messages
    are read in the order it sent them (NCCL matches the k-th send with the k-th receive)."""
    for pp in range(2, 6):
        for micro in range(1, 11):
            steps = [zero_bubble.zb_v(pp=pp, pp_rank=r, micro_batches=micro) for r in range(pp)]
            sent = {}  # (sender, receiver) -> [(kind, stage, micro)] in send order
            for r in range(pp):
                for step in steps[r]:
                    for kind, chunk, m in step:
                        if kind not in ("F", "B"):
                            continue
                        stage = r if chunk == 0 else 2 * pp - 1 - r
                        target = stage + 1 if kind == "F" else stage - 1
                        if 0 <= target < 2 * pp:
                            dest = zero_bubble.stage_owner(target, pp=pp, v_shape=True)[0]
                            if dest != r:
                                sent.setdefault((r, dest), []).append((kind, target, m))
            for r in range(pp):
                read = {}
                for step in steps[r]:
                    for kind, chunk, m in step:
                        if kind in ("RF", "RB"):
                            stage = r if chunk == 0 else 2 * pp - 1 - r
                            source = stage - 1 if kind == "RF" else stage + 1
                            sender = zero_bubble.stage_owner(source, pp=pp, v_shape=True)[0]
                            read.setdefault(sender, []).append((kind[1], stage, m))
                for sender, messages in read.items():
                    assert messages == sent[(sender, r)], (pp, micro, sender, r)


# -- 3. training on real ranks equals one process ---------------------------------------------------------

LLAMA = FLAVOURS["llama"]
DOCUMENTS = ["data.document_attention_mask=true", "data.tokenizer=unused"]
H1, V = "parallel.pipeline_schedule=zb-h1", "parallel.pipeline_schedule=zb-v"
MOE = ["model.moe.num_experts=4", "model.moe.ffn_hidden_size=32", "model.moe.shared_experts=1"]
# name -> (reference overrides, layout overrides, world)
LAYOUTS = {
    "pp2_zb_h1": (LLAMA, ["parallel.pipeline=2", H1], 2),
    "pp2_zb_v": (LLAMA, ["parallel.pipeline=2", V], 2),
    "pp4_zb_h1_recompute": (LLAMA, ["parallel.pipeline=4", H1, "model.activation_checkpointing=full"], 4),
    "pp4_zb_v_selective": (
        LLAMA + ["model.num_layers=8"],
        ["parallel.pipeline=4", V, "model.activation_checkpointing=selective"],
        4,
    ),
    "gpt2_pp2_tp2_sp_zb_h1": (
        [],
        ["parallel.pipeline=2", "parallel.tensor=2", "parallel.sequence_parallel=true", H1],
        4,
    ),
    "pp2_tp2_sp_zb_v": (LLAMA, ["parallel.pipeline=2", "parallel.tensor=2", "parallel.sequence_parallel=true", V], 4),
    "pp2_dp2_zb_h1": (LLAMA, ["parallel.pipeline=2", H1, "parallel.bucket_mb=0.01"], 4),
    "pp2_dp2_zb_v_documents": (LLAMA + DOCUMENTS, ["parallel.pipeline=2", V, "parallel.bucket_mb=0.01"], 4),
    "cp2_pp2_zb_h1": (LLAMA, ["parallel.pipeline=2", "parallel.context=2", H1], 4),
    # Mixture of experts: grouped-matmul experts and the router compute their weight gradients in
    # B (not split: correct, only not deferred); the per-expert loop's experts are split linears.
    "moe_pp2_zb_v": (LLAMA + MOE + ["model.moe.grouped_mm=true"], ["parallel.pipeline=2", V], 2),
    # expert parallelism: EP 2 over the 2 data-parallel ranks of each stage
    "moe_ep2_pp2_zb_v": (
        LLAMA + MOE + ["model.moe.grouped_mm=false"],
        ["parallel.pipeline=2", "parallel.expert=2", V, "parallel.bucket_mb=0.01"],
        4,
    ),
    "moe_sigmoid_router_pp2_zb_h1": (
        MOE + ["model.moe.router=sigmoid", "model.moe.bias_update_rate=0.05", "model.moe.grouped_mm=false"],
        ["parallel.pipeline=2", H1],
        2,
    ),
}
_reference: dict = {}


def reference(overrides: list[str]) -> dict:
    key = tuple(overrides)
    if key not in _reference:
        _reference[key] = run_layout(overrides, world=1)
    return _reference[key]


def _assert_same(got: dict, ref: dict, name: str) -> None:
    assert got["loss"] == pytest.approx(ref["loss"], abs=2e-5), name
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), name
    assert ref["loss"][0] != ref["loss"][-1]


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_single_process(name):
    base, layout, world = LAYOUTS[name]
    got = run_layout(base + layout, world=world)
    _assert_same(got, reference(base), name)
    if "dp2" in name:  # every bucket's all-reduce started during the W's of its parameters
        assert got["buckets"] > 1 and got["overlapped"] == 3 * got["buckets"]


# gpt2 (tied embedding) under zb-v: pipeline rank 0 holds both copies, summed within the rank
# (pretrain/parallel/tied.py). name -> (reference overrides, layout overrides, world)
TIED_V = {
    "gpt2_pp2_zb_v": ([], ["parallel.pipeline=2", V], 2),
    "gpt2_pp4_zb_v": (["model.num_layers=8"], ["parallel.pipeline=4", V], 4),
    "gpt2_pp2_tp2_sp_zb_v": ([], ["parallel.pipeline=2", "parallel.tensor=2", "parallel.sequence_parallel=true", V], 4),
    "gpt2_pp2_dp2_zb_v": ([], ["parallel.pipeline=2", V, "parallel.bucket_mb=0.01"], 4),
    "gpt2_zero1_pp2_dp2_zb_v": ([], ["parallel.pipeline=2", V, "parallel.zero_stage=1", "parallel.bucket_mb=0.01"], 4),
}


def _train_tied(overrides: list[str], steps: int) -> dict:
    """train_steps (any strategy), and how far apart this rank's copies of the tied embedding
    ended up (zb-v's rank 0 holds both: they must stay bit-for-bit equal)."""
    from parallel_harness import build_trainer

    from pretrain.parallel.tied import tied_copies

    trainer = build_trainer(make_config(overrides), steps)
    records = [trainer.step(step) for step in range(1, steps + 1)]
    copies = tied_copies([p for chunk in trainer.chunks for p in chunk.parameters()])
    sync = getattr(trainer.strategy, "grad_sync", None)  # plain data parallelism's buckets
    return {
        "logging": trainer.topo.is_logging_rank,
        "copies": len(copies),
        "copies_differ": float((copies[0] - copies[1]).detach().abs().max()) if len(copies) == 2 else None,
        "buckets": len(sync.buckets) if sync else 0,
        "overlapped": sync.overlapped if sync else 0,
        "loss": [r["loss"] for r in records],
        "grad_norm": [r["grad_norm"] for r in records],
    }


@pytest.mark.parametrize("name", TIED_V)
def test_tied_embedding_under_zb_v_matches_single_process(name):
    base, layout, world = TIED_V[name]
    results = run_ranks(world, _train_tied, base + layout, 3)
    (got,) = [r for r in results if r["logging"]]
    ref = reference(base)
    loss = max(abs(a - b) for a, b in zip(got["loss"], ref["loss"]))
    norm = max(abs(a - b) / b for a, b in zip(got["grad_norm"], ref["grad_norm"]))
    print(f"{name}: max |loss diff| {loss:.3g}, max relative grad-norm diff {norm:.3g}")
    _assert_same(got, ref, name)
    # Pipeline rank 0 (and only it) holds both copies; they are still bit-for-bit equal after 3 updates.
    holders = [r for r in results if r["copies"] == 2]
    assert holders and all(r["copies_differ"] == 0.0 for r in holders), results
    assert all(r["copies"] == 0 for r in results if r not in holders)
    if "dp2" in name and "zero1" not in name:  # the buckets, the tied copies' included, overlapped the W's
        assert got["buckets"] > 1 and got["overlapped"] == 3 * got["buckets"]


def test_zero1_matches_single_process():
    layout = ["parallel.pipeline=2", V, "parallel.zero_stage=1", "parallel.bucket_mb=0.01"]
    (logging, *_) = run_job(LLAMA + layout, world=4)
    _assert_same(logging, reference(LLAMA), "zero1_pp2_dp2_zb_v")


def test_a_zero_bubble_checkpoint_resumes_under_other_schedules(tmp_path):
    """ZB-V's rank 0 holds stages 0 and 3 (interleaved's: 0 and 2): a ZB-V checkpoint saved under
    ZeRO-1 at step 2 resumes under interleaved 1F1B (as many chunks, other layers) and under
    ZB-H1 without ZeRO, with the uninterrupted run's losses."""
    saved = LLAMA + ["parallel.pipeline=2", V, "parallel.zero_stage=1"]
    straight = run_job(saved, world=4, last=3, save=str(tmp_path), save_at=2)[0]
    interleaved = ["parallel.pipeline=2", "parallel.virtual_stages=2", "parallel.zero_stage=1"]
    for layout, world in ((interleaved, 4), (["parallel.pipeline=2", H1], 2)):
        resumed = run_job(LLAMA + layout, world=world, first=3, last=3, resume=str(tmp_path / "step_2"))[0]
        assert resumed["loss"] == pytest.approx(straight["loss"][2:], abs=2e-5), layout


ZERO1 = ["parallel.zero_stage=1"]
PP2_1F1B, PP2_ZB_V = ["parallel.pipeline=2"], ["parallel.pipeline=2", V]
PP2_INTERLEAVED = ["parallel.pipeline=2", "parallel.virtual_stages=2"]
# saved layout (world) -> the layouts (world) it resumes under; gpt2, tied embedding
TIED_RESUMES = {
    # zb-v's rank 0 saves one of its two copies (ZeRO-1: one run per rank, the first copy's where it has one)
    "zb_v_zero1": ((PP2_ZB_V + ZERO1, 4), [(PP2_ZB_V + ZERO1, 4), (PP2_INTERLEAVED + ZERO1, 4), (PP2_1F1B, 2)]),
    "zb_v": ((PP2_ZB_V, 2), [(PP2_ZB_V, 2), (PP2_1F1B + ZERO1, 4)]),
    # and the other way: the first and the last rank's copies both load into zb-v's rank 0
    "1f1b": ((PP2_1F1B, 2), [(PP2_ZB_V, 2), (PP2_ZB_V + ZERO1, 4)]),
    "interleaved_zero1": ((PP2_INTERLEAVED + ZERO1, 4), [(PP2_ZB_V + ZERO1, 4)]),
}


@pytest.mark.parametrize("name", TIED_RESUMES)
def test_a_tied_checkpoint_resumes_across_zb_v(name, tmp_path):
    """A gpt2 checkpoint saved at step 2 resumes for steps 3 and 4 with the uninterrupted run's
    losses and gradient norms (step 4's after an update from the restored optimizer state),
    between zb-v (both copies of the tied embedding on rank 0) and the schedules that hold them
    on two ranks, with and without ZeRO-1 on either side."""
    (saved, world), resumes = TIED_RESUMES[name]
    straight = run_job(saved, world=world, last=4, save=str(tmp_path), save_at=2)[0]
    for layout, world in resumes:
        ranks = run_job(layout, world=world, first=3, last=4, resume=str(tmp_path / "step_2"))
        resumed = ranks[0]
        if layout == saved and ZERO1[0] in layout:  # at its own layout (PP2 x DP2) a ZeRO rank reads its own files only
            for r in ranks:
                own = f"tp0_pp{r['rank'] // 2}_part{r['dp_rank']}.safetensors"
                assert set(r["read_files"]) == {f"model_{own}", f"optimizer_{own}"}, r
        loss = max(abs(a - b) for a, b in zip(resumed["loss"], straight["loss"][2:]))
        norm = max(abs(a / b - 1) for a, b in zip(resumed["grad_norm"], straight["grad_norm"][2:]))
        print(f"{name} -> {layout}: max |loss diff| {loss:.3g}, max grad-norm rel diff {norm:.3g}")
        assert resumed["loss"] == pytest.approx(straight["loss"][2:], abs=2e-5), layout
        assert resumed["grad_norm"] == pytest.approx(straight["grad_norm"][2:], rel=1e-4), layout
    if name == "zb_v_zero1":  # and the checkpoint exports: transformers' GPT-2 computes our logits
        _check_hf_export(tmp_path / "step_2", tmp_path / "hf")


def _check_hf_export(step_dir, hf_dir) -> None:
    import transformers

    from pretrain.checkpoint import load_model
    from pretrain.hf import export_checkpoint

    export_checkpoint(step_dir, hf_dir, log=lambda message: None)
    ours, config = load_model(step_dir)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, local_files_only=True).eval()
    assert theirs.config.tie_word_embeddings
    tokens = torch.randint(
        0, config.model.vocab_size, (2, config.model.seq_length), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        diff = (ours(tokens)[..., : config.model.vocab_size] - theirs(tokens).logits).abs().max()
    print(f"zb-v tied checkpoint exported: max |logit diff| vs transformers {float(diff):.3g}")
    assert diff < 1e-4


def test_train_cli_under_zb_v_logs_validates_and_exports(stdlib_data, tmp_path):
    """`python -m pretrain.train` at PP2 under ZB-V (torchrun): the loss and the validation loss
    live on pipeline rank 0 (the V's last stage), the run logs both, checkpoints, and the merged
    single-device model reproduces the logged validation loss."""
    import json

    from test_train_parallel import merged_validation_loss, small

    layout = ["parallel.tensor=1", "parallel.pipeline=2", V, "model.flavour=llama", "model.num_kv_heads=2"]
    result = torchrun(2, small(stdlib_data, tmp_path) + layout + ["train.steps=4"])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "logs/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    validations = [r["val_loss"] for r in records if "val_loss" in r]
    assert validations and all(v == v for v in validations)  # no NaN: the loss is on rank 0
    logged = validations[-1]
    assert abs(merged_validation_loss(tmp_path / "ckpt") - logged) < 1e-5


# -- 4. refused settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        ([H1], "parallel.pipeline_schedule", "set parallel.pipeline > 1"),
        (["parallel.pipeline=2", "parallel.pipeline_schedule=zbv"], "parallel.pipeline_schedule", "'zb-v'"),
        (["parallel.pipeline=2", V, "parallel.virtual_stages=4"] + LLAMA, "parallel.virtual_stages", "exactly two"),
        (["parallel.pipeline=2", H1, "parallel.virtual_stages=2"], "parallel.virtual_stages", "one chunk per rank"),
        (["parallel.pipeline=2", "parallel.pipeline_schedule=interleaved"], "parallel.pipeline_schedule", "> 1"),
        (["parallel.pipeline=2", H1, "parallel.zero_stage=2"] + LLAMA, "parallel.zero_stage", "zero_stage=1"),
        (["parallel.pipeline=2", H1, "model.compile=true"], "model.compile", "compile=false"),
    ],
)
def test_bad_schedule_settings_are_refused(overrides, key, words):
    with pytest.raises(ConfigError, match=key) as error:
        make_config(overrides)
    assert words in str(error.value)


def test_virtual_stages_alone_still_means_interleaved():
    config = make_config(["parallel.pipeline=2", "parallel.virtual_stages=2"])
    assert (config.parallel.pipeline_schedule, config.parallel.schedule) == (None, "interleaved")
    v = make_config(["parallel.pipeline=2", V] + LLAMA)
    assert (v.parallel.pipeline_schedule, v.parallel.virtual_stages) == ("zb-v", 2)
    # The V's first and last stage (embedding, loss) share rank 0.
    topo = grid_position(rank=0, pp=2, virtual_stages=2, pipeline_schedule="zb-v")
    assert topo.is_first_stage and topo.is_last_stage
    assert Op("F", 1, 0) in flatten(make_schedule(topo, 2))
