"""Gradients in persistent flat buffers (pretrain/parallel/data.py GradientSync): every `.grad` is
a view into its bucket's buffer, stays one across micro-batches and steps (autograd accumulates
in place, the optimizer and clipping work on the views), is zeroed in place, and the DP
all-reduce on the buffers gives the single-process result."""

from __future__ import annotations

import pytest
import torch
from parallel_harness import make_config, run_layout, run_ranks
from torch import nn

from pretrain.parallel.bootstrap import init_distributed
from pretrain.parallel.data import GradientSync, clip_gradients
from pretrain.parallel.topology import single_process

BATCH, WIDTH, MICRO = 8, 16, 4  # global batch, features, micro-batches per step (single process)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(WIDTH, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 1))
        self.unused = nn.Linear(4, 4)  # gets no gradient: must still hold (zero) views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Model()


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, 1, generator=g)


def _backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, parts: int) -> None:
    """Mean-squared error over x, as `parts` accumulated micro-batches."""
    for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
        (nn.functional.mse_loss(model(xs), ys) / parts).backward()


def _inside(grad: torch.Tensor, buffer: torch.Tensor) -> bool:
    start, size = buffer.data_ptr(), buffer.numel() * buffer.element_size()
    return start <= grad.data_ptr() and grad.data_ptr() + grad.numel() * grad.element_size() <= start + size


def _check_views(sync: GradientSync, pointers: dict[int, int]) -> None:
    for bucket in sync.buckets:
        for p in bucket.params:
            assert p.grad is not None and _inside(p.grad, bucket.buffer)
            assert p.grad.data_ptr() == pointers[id(p)]  # the very same view as at construction


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)


def test_gradients_are_views_into_the_buckets_across_steps():
    """Several buckets (tiny bucket_mb), 4 micro-batches a step, clipping and AdamW foreach: the
    views never move, and the weights end equal to a model trained with ordinary gradients."""
    model, reference = _model(), _model()
    sync = GradientSync([model], single_process(), bucket_mb=1e-4)
    params = [p for p in model.parameters()]
    assert len(sync.buckets) > 2
    assert sorted(id(p) for b in sync.buckets for p in b.params) == sorted(id(p) for p in params)
    # reverse order (gradients arrive from the last layer back): the last parameter comes first
    assert sync.buckets[0].params[0] is params[-1] and sync.buckets[-1].params[-1] is params[0]
    pointers = {id(p): p.grad.data_ptr() for p in params}
    opt, ref_opt = _optimizer(model), _optimizer(reference)
    for step in range(3):
        x, y = _data(step)
        _backward(model, x, y, parts=MICRO)
        _check_views(sync, pointers)
        sync.finish()
        _backward(reference, x, y, parts=MICRO)
        for p, q in zip(params, reference.parameters()):
            want = q.grad if q.grad is not None else torch.zeros_like(q)
            torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-7)
        clip_gradients(params, norm=10.0, max_norm=1.0)  # in place, through the views
        clip_gradients([q for q in reference.parameters()], norm=10.0, max_norm=1.0)
        opt.step()
        ref_opt.step()
        sync.zero_grad()
        ref_opt.zero_grad(set_to_none=True)
        _check_views(sync, pointers)
    for p, q in zip(params, reference.parameters()):
        if p is model.unused.weight or p is model.unused.bias:
            continue  # AdamW skips a None gradient but steps a zero one (weight decay)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert model.unused.weight.grad.abs().sum() == 0


def test_zero_grad_zeroes_in_place_and_reattaches():
    model = _model()
    sync = GradientSync([model], single_process(), bucket_mb=1e-4)
    pointers = {id(p): p.grad.data_ptr() for p in model.parameters()}
    buffers = [b.buffer.data_ptr() for b in sync.buckets]
    _backward(model, *_data(0), parts=2)
    assert all(b.buffer.abs().sum() > 0 for b in sync.buckets)
    sync.zero_grad()
    assert all(int(b.buffer.count_nonzero()) == 0 for b in sync.buckets)
    assert [b.buffer.data_ptr() for b in sync.buckets] == buffers
    _check_views(sync, pointers)
    # An optimizer's zero_grad(set_to_none=True) detaches the views; ours attaches them again.
    _optimizer(model).zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    sync.zero_grad()
    _check_views(sync, pointers)


def test_bucket_never_spans_chunks_and_keeps_dtype():
    torch.manual_seed(0)
    first, second = nn.Linear(8, 8), nn.Linear(8, 8).double()
    sync = GradientSync([first, second], single_process(), bucket_mb=25)
    assert [len(b.params) for b in sync.buckets] == [2, 2]
    assert [b.buffer.dtype for b in sync.buckets] == [torch.float32, torch.float64]
    assert all(p.grad.dtype == p.dtype for p in [*first.parameters(), *second.parameters()])


# -- two gloo ranks ----------------------------------------------------------------------------


def _dp_rank() -> dict:
    """One of two gloo ranks: 2 micro-batches of its half of each global batch, 3 steps; the
    reduced gradients against the whole batch's, computed alone by this process."""
    topo = init_distributed(make_config([]), device=torch.device("cpu"))
    model, reference = _model(), _model()
    sync = GradientSync([model], topo, bucket_mb=1e-4)
    pointers = {id(p): p.grad.data_ptr() for p in model.parameters()}
    errors = []
    for step in range(3):
        x, y = _data(step)
        share = slice(topo.dp_rank * BATCH // topo.dp, (topo.dp_rank + 1) * BATCH // topo.dp)
        xs, ys = x[share].chunk(2), y[share].chunk(2)  # this rank's 2 micro-batches
        (nn.functional.mse_loss(model(xs[0]), ys[0]) / 2).backward()
        sync.enable(0)
        (nn.functional.mse_loss(model(xs[1]), ys[1]) / 2).backward()
        sync.finish()
        _check_views(sync, pointers)
        _backward(reference, x, y, parts=topo.dp * 2)  # the whole global batch, in one process
        for p, q in zip(model.parameters(), reference.parameters()):
            want = q.grad if q.grad is not None else torch.zeros_like(q)
            errors.append(float((p.grad - want).abs().max()))
        sync.zero_grad()
        reference.zero_grad(set_to_none=True)
    return {"errors": errors, "overlapped": sync.overlapped, "buckets": len(sync.buckets)}


def test_two_gloo_ranks_reduce_in_place_to_the_global_gradient():
    """Every bucket but the one holding the unused layer starts its all-reduce inside the last
    backward; the unused layer's zeros are reduced in finish(); the views never move."""
    for r in run_ranks(2, _dp_rank):
        assert max(r["errors"]) < 1e-6
        assert r["buckets"] > 2 and r["overlapped"] == 3 * (r["buckets"] - 1)


def test_dp2_trains_like_a_single_process():
    """The tiny GPT of tests/parallel_harness.py, 3 steps, several buckets: DP=2 on gloo equals
    the single process (the tolerance of tests/test_parallel.py)."""
    ref = run_layout(["parallel.bucket_mb=0.01"], world=1)
    got = run_layout(["parallel.bucket_mb=0.01"], world=2)
    assert got["loss"] == pytest.approx(ref["loss"], abs=2e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert got["buckets"] > 1 and got["overlapped"] == 3 * got["buckets"]
