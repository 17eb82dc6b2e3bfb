"""The single-device fused output layer + cross-entropy (pretrain/models/loss.py) against
F.cross_entropy in float64, and the scratch buffer it keeps between steps."""

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.kernels import linear_cross_entropy
from pretrain.models.loss import IGNORE_INDEX, ScratchBuffer


def reference(hidden, weight, labels, vocab):
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    loss = F.cross_entropy(F.linear(h, w[:vocab]), labels, ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss, h.grad, w.grad


def case(n=301, h=40, vocab=1000, rows=1024, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(rows, h, generator=g) * scale).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::7] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("scratch", [None, ScratchBuffer()], ids=["fresh", "scratch"])
def test_matches_cross_entropy_in_float64(scratch):
    hidden, weight, labels = case()
    for _ in range(2):  # the second step reuses the kept buffer
        hidden.grad = weight.grad = None
        loss = linear_cross_entropy(hidden, weight, labels, vocab_size=1000, scratch=scratch)
        (loss * 3).backward()  # an upstream factor reaches both gradients
    ref, ref_h, ref_w = reference(hidden, weight, labels, 1000)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert (hidden.grad / 3 - ref_h).abs().max() < 1e-6 * ref_h.abs().max() * 10
    assert (weight.grad / 3 - ref_w).abs().max() < 1e-6 * ref_w.abs().max() * 10
    assert weight.grad[1000:].abs().max() == 0  # padding rows: zero gradient, not in the softmax


def test_far_targets_do_not_underflow():
    # The target logit 300 below the row's max: exp underflows to 0 in fp32, the loss must not.
    hidden = torch.tensor([[300.0, 0.0], [0.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([2, 0])
    loss = linear_cross_entropy(hidden, weight, labels, vocab_size=3)
    ref, _, _ = reference(hidden, weight, labels, 3)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_bf16_autocast_is_close():
    hidden, weight, labels = case(scale=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, vocab_size=1000)
    loss.backward()
    ref, ref_h, ref_w = reference(hidden, weight, labels, 1000)
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
    assert F.cosine_similarity(hidden.grad.flatten().double(), ref_h.flatten(), dim=0) > 0.999
    assert F.cosine_similarity(weight.grad.flatten().double(), ref_w.flatten(), dim=0) > 0.999


def test_scratch_is_reused_but_never_while_held():
    scratch = ScratchBuffer()
    first = scratch.take((4, 8), torch.float32, torch.device("cpu"))
    pointer = first.data_ptr()
    del first
    assert scratch.take((2, 8), torch.float32, torch.device("cpu")).data_ptr() == pointer  # free: reused
    held = scratch.take((4, 8), torch.float32, torch.device("cpu"))
    assert scratch.take((4, 8), torch.float32, torch.device("cpu")).data_ptr() != held.data_ptr()
    # Two micro-batches in flight through the loss, then both backwards: each kept its own buffer.
    hidden, weight, labels = case()
    other = torch.randint(0, 1000, labels.shape, generator=torch.Generator().manual_seed(5))
    losses = [
        linear_cross_entropy(hidden * (i + 1), weight, lab, vocab_size=1000, scratch=scratch)
        for i, lab in enumerate((labels, other))
    ]
    sum(losses).backward()
    got = hidden.grad.clone()
    hidden.grad = None
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double()[:1000]
    (F.cross_entropy(F.linear(h, w), labels) + F.cross_entropy(F.linear(2 * h, w), other)).backward()
    assert (got - h.grad).abs().max() < 1e-5


def test_backward_twice_is_refused():
    hidden, weight, labels = case()
    loss = linear_cross_entropy(hidden, weight, labels, vocab_size=1000)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()
