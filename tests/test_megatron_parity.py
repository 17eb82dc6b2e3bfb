"""Our tensor-parallel layers agree with megatron-core 0.16.1's on 2 real gloo ranks.

Both sides get the same full weights (each rank slices its own shard: column-parallel and the
embedding hold rows [r*n/2, (r+1)*n/2), row-parallel holds those columns), the same inputs and
the same upstream gradients; we compare outputs and input/weight/bias gradients per rank.

megatron-core runs here as an oracle only: `parallel_state.initialize_model_parallel` over gloo
and its layers built from a `ModelParallelConfig(use_cpu_initialization=True)` (its CUDA RNG
setup, `model_parallel_cuda_manual_seed`, is never called: it fails on CPU and no layer here
draws random numbers).

Tolerance: fp32 throughout; both sides compute the same products with the same reductions.
Observed (torch 2.13 CPU): outputs and every gradient are bit-identical; the mean cross-entropy
differs by at most 1 ulp (~1e-6 at a loss of 7.5, summation order). We allow, elementwise,
|ours - megatron| <= 1e-6 + 1e-5 * |megatron| and report the observed maximum on failure.

One spawn of 2 ranks runs every comparison (megatron's import costs ~5 s per process); the
ranks return their max differences and the tests below assert on them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel_harness import run_ranks

TP = 2
ATOL, RTOL = 1e-6, 1e-5
# Shapes: tokens as [batch, seq]; megatron's layers take [seq, batch, ...] but are position-wise,
# so the same [b, s, ...] tensors go into both.
B, S, H, OUT, VOCAB = 2, 5, 16, 24, 32


def _full_tensors() -> dict[str, torch.Tensor]:
    """Every full (unsharded) weight and input, from one seed: identical on both ranks."""
    g = torch.Generator().manual_seed(2024)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    # Labels on both halves of the vocabulary, so both ranks own some targets.
    labels[0, 0], labels[1, 1] = 0, VOCAB - 1
    return {
        "col_w": rand(OUT, H),
        "col_b": rand(OUT),
        "col_x": rand(B, S, H),
        "col_gy": rand(B, S, OUT),
        "row_w": rand(H, OUT),
        "row_b": rand(H),
        "row_x": rand(B, S, OUT),
        "row_gy": rand(B, S, H),
        "emb_w": rand(VOCAB, H),
        "emb_gy": rand(B, S, H),
        "tokens": torch.randint(0, VOCAB, (B, S), generator=g),
        "logits": 3 * rand(B, S, VOCAB),
        "labels": labels,
    }


def _rows(t: torch.Tensor, rank: int, dim: int = 0) -> torch.Tensor:
    return t.chunk(TP, dim=dim)[rank].contiguous()


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Max absolute difference and whether it is inside ATOL + RTOL * |b|."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    excess = ((a - b).abs() - (ATOL + RTOL * b.abs())).max().item()
    return {"max_abs": (a - b).abs().max().item(), "ok": excess <= 0, "scale": b.abs().max().item()}


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_(True)


def _compare(rank: int) -> dict[str, dict]:
    from megatron.core import ModelParallelConfig
    from megatron.core import tensor_parallel as mtp

    from pretrain.parallel import tensor as ours
    from pretrain.parallel.bootstrap import build_topology

    topo = build_topology(tp=TP, pp=1, dp=1)
    assert topo.tp_rank == rank
    config = ModelParallelConfig(
        tensor_model_parallel_size=TP, use_cpu_initialization=True, perform_initialization=False
    )
    full = _full_tensors()
    out: dict[str, dict] = {}

    def no_init(weight):  # weights are copied in below
        return weight

    def load(module, **tensors):
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(module, name).copy_(value)
        return module

    # Column-parallel linear, with bias, output left split.
    w, b = _rows(full["col_w"], rank), _rows(full["col_b"], rank)
    gy = _rows(full["col_gy"], rank, dim=-1)
    mine = load(ours.ColumnParallelLinear(H, OUT, bias=True, stacked=1, topo=topo), weight=w, bias=b)
    theirs = load(
        mtp.ColumnParallelLinear(H, OUT, config=config, init_method=no_init, bias=True, gather_output=False),
        weight=w,
        bias=b,
    )
    x_ours, x_theirs = _leaf(full["col_x"]), _leaf(full["col_x"])
    y_ours = mine(x_ours)
    y_theirs, _ = theirs(x_theirs)
    y_ours.backward(gy)
    y_theirs.backward(gy)
    out["column.output"] = _diff(y_ours, y_theirs)
    out["column.input_grad"] = _diff(x_ours.grad, x_theirs.grad)
    out["column.weight_grad"] = _diff(mine.weight.grad, theirs.weight.grad)
    out["column.bias_grad"] = _diff(mine.bias.grad, theirs.bias.grad)

    # Row-parallel linear, input already split, bias added after the reduction.
    w, b = _rows(full["row_w"], rank, dim=1), full["row_b"]
    mine = load(ours.RowParallelLinear(OUT, H, bias=True, topo=topo), weight=w, bias=b)
    theirs = load(
        mtp.RowParallelLinear(
            OUT, H, config=config, init_method=no_init, bias=True, input_is_parallel=True, skip_bias_add=False
        ),
        weight=w,
        bias=b,
    )
    x = _rows(full["row_x"], rank, dim=-1)
    x_ours, x_theirs = _leaf(x), _leaf(x)
    y_ours = mine(x_ours)
    y_theirs, _ = theirs(x_theirs)
    y_ours.backward(full["row_gy"])
    y_theirs.backward(full["row_gy"])
    out["row.output"] = _diff(y_ours, y_theirs)
    out["row.input_grad"] = _diff(x_ours.grad, x_theirs.grad)
    out["row.weight_grad"] = _diff(mine.weight.grad, theirs.weight.grad)
    out["row.bias_grad"] = _diff(mine.bias.grad, theirs.bias.grad)

    # Vocabulary-parallel embedding.
    w = _rows(full["emb_w"], rank)
    mine = load(ours.VocabParallelEmbedding(VOCAB, H, topo=topo), weight=w)
    theirs = load(mtp.VocabParallelEmbedding(VOCAB, H, init_method=no_init, config=config), weight=w)
    y_ours, y_theirs = mine(full["tokens"]), theirs(full["tokens"])
    y_ours.backward(full["emb_gy"])
    y_theirs.backward(full["emb_gy"])
    out["embedding.output"] = _diff(y_ours, y_theirs)
    out["embedding.weight_grad"] = _diff(mine.weight.grad, theirs.weight.grad)

    # Vocabulary-parallel cross-entropy. Ours returns the mean over labels != -100 of [b, s]
    # logits; megatron returns per-token losses of [s, b] logits and has no ignore index, so its
    # side gets a valid stand-in label at the ignored position and is masked by hand.
    logits = _rows(full["logits"], rank, dim=-1)
    for case, labels in (("all_valid", full["labels"]), ("ignore_index", full["labels"].clone())):
        valid = torch.ones(B, S, dtype=torch.bool)
        if case == "ignore_index":
            labels[1, 2] = -100
            valid[1, 2] = False
        l_ours, l_theirs = _leaf(logits), _leaf(logits)
        loss_ours = ours.vocab_parallel_cross_entropy(l_ours, labels, topo=topo)
        stand_in = labels.masked_fill(~valid, 0).t().contiguous()  # [s, b]
        # Megatron writes into its logits argument: give it a copy, not the leaf.
        copy = l_theirs.transpose(0, 1).clone(memory_format=torch.contiguous_format)  # [s, b, V/tp]
        per_token = mtp.vocab_parallel_cross_entropy(copy, stand_in)  # [s, b]
        loss_theirs = (per_token * valid.t()).sum() / valid.sum()
        loss_ours.backward()
        loss_theirs.backward()
        out[f"cross_entropy.{case}.loss"] = _diff(loss_ours, loss_theirs)
        out[f"cross_entropy.{case}.logits_grad"] = _diff(l_ours.grad, l_theirs.grad)
        if case == "ignore_index":  # the ignored token contributes nothing on either side
            out[f"cross_entropy.{case}.ignored_row_zero"] = {
                "max_abs": l_ours.grad[1, 2].abs().max().item(),
                "scale": 0.0,
                "ok": bool((l_ours.grad[1, 2] == 0).all()) and bool((l_theirs.grad[1, 2] == 0).all()),
            }
        # A dense reference for the loss too, so both could not be wrong the same way.
        dense = torch.nn.functional.cross_entropy(full["logits"].flatten(0, 1), labels.flatten(), ignore_index=-100)
        out[f"cross_entropy.{case}.loss_vs_dense"] = _diff(loss_ours, dense)
    return out


def _worker() -> dict[str, dict]:
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo")
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
        return _compare(dist.get_rank())
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def parity() -> list[dict[str, dict]]:
    pytest.importorskip("megatron.core")
    return run_ranks(TP, _worker)


GROUPS = {
    "column": ["output", "input_grad", "weight_grad", "bias_grad"],
    "row": ["output", "input_grad", "weight_grad", "bias_grad"],
    "embedding": ["output", "weight_grad"],
    "cross_entropy.all_valid": ["loss", "logits_grad", "loss_vs_dense"],
    "cross_entropy.ignore_index": ["loss", "logits_grad", "ignored_row_zero", "loss_vs_dense"],
}


@pytest.mark.parametrize("layer", list(GROUPS))
def test_matches_megatron(parity, layer):
    for rank, result in enumerate(parity):
        for quantity in GROUPS[layer]:
            d = result[f"{layer}.{quantity}"]
            assert d["ok"], (
                f"rank {rank} {layer} {quantity}: max |ours - megatron| = {d['max_abs']:.3e} "
                f"(values up to {d['scale']:.3e}; atol {ATOL}, rtol {RTOL})"
            )
