"""The backward split for zero-bubble pipelines: B (input gradients) now, W (weight gradients)
later.

A zero-bubble schedule (pretrain/parallel/zero_bubble.py) runs each backward as B, the
gradient of the stage's input that the previous stage waits for, and defers W, the weight
gradients nobody waits for, into time the rank would otherwise idle (Qi et al., ICLR 2024; the
`WeightGradStore` idea). Every layer with weights gets a split version here: linear
(`linear`, the tensor-parallel ones and the output layer included), a bias added after a
tensor-parallel reduction (`bias_add`), LayerNorm / RMSNorm (`layer_norm`, `rms_norm`) and
embeddings (`embedding`); the fused output layer + loss defers its own (models/loss.py). Their
backward computes the input gradient only and leaves on the stage's store a closure holding
exactly what the weight gradient needs: the layer's input (LayerNorm: the input and its
per-row statistics; RMSNorm: the normalized input; an embedding: the token ids) and the output
gradient. Nothing else of the graph stays alive for W. Each runs the same torch kernels as the
plain layer (native_layer_norm's backward with an output mask per half, F.rms_norm's own
decomposition, the same matmuls), so B + W gives the plain backward's gradients bit for bit on
CPU (tests/test_zero_bubble.py).

The pipeline executor seals a B's closures under (chunk, micro-batch) and runs them at that
W (`run`) inside one autograd pass (`accumulate`): AccumulateGrad adds the gradients into
`.grad` (the data-parallel gradient buffers) and the post-accumulate hooks fire as in a plain
backward, so DP buckets and ZeRO start reducing when the W's of their parameters are done.

Weights enter the split functions detached: a weight that took part in autograd would get its
AccumulateGrad node called in B (with no gradient, but its hooks still fire, which would count
as a finished gradient). The store's `anchor`, a leaf that requires grad and never gets a
gradient, is an input of every split function instead, so its output is part of the graph even
where the weights were the only trainable input (the embedding).

Activation checkpointing needs nothing special: the recomputed forward saves what the original
did and the original graph's nodes run the split backward.

Layers only use this when a zero-bubble schedule attached a store
(pretrain/parallel/model_chunks.py); otherwise they run their plain forward, unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn

Grads = list[tuple[nn.Parameter, torch.Tensor]]
Deferred = tuple[tuple[nn.Parameter, ...], Callable[[], Grads]]  # the parameters, their W


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [tokens, n]."""
    return t.reshape(-1, t.shape[-1])


class WeightGradStore:
    """One per pipeline rank: the deferred weight-gradient closures of its B's, by B."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.anchor = torch.zeros((), device=device, requires_grad=True)
        self._open: list[Deferred] = []
        self._sealed: dict[Hashable, list[Deferred]] = {}

    def defer(self, params: tuple[nn.Parameter | None, ...], fn: Callable[[], Grads]) -> None:
        """Called by a split layer's backward: fn() returns the (parameter, gradient) pairs of
        `params` (those that require a gradient)."""
        params = tuple(p for p in params if p is not None and p.requires_grad)
        if params:
            self._open.append((params, fn))

    def seal(self, key: Hashable) -> None:
        """After a B: its closures belong to `key` (the executor's (chunk, micro-batch))."""
        assert key not in self._sealed, f"B {key} ran twice before its W"
        self._sealed[key], self._open = self._open, []

    def run(self, key: Hashable, *, root: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """The W of `key`: its B's weight gradients, added to .grad (`accumulate`)."""
        accumulate(self._sealed.pop(key, []), root=root)

    def pending(self) -> int:
        """Closures not yet run (0 after a step's schedule has run every W)."""
        return len(self._open) + sum(len(v) for v in self._sealed.values())

    # -- the split layers -------------------------------------------------------------------------

    def linear(self, x: torch.Tensor, weight: nn.Parameter, bias: nn.Parameter | None) -> torch.Tensor:
        """F.linear(x, weight, bias), with dW and db deferred; autocast as F.linear's."""
        dtype = _autocast_dtype(x)
        w, b = weight.detach(), None if bias is None else bias.detach()
        if dtype is not None:  # what autocast does to F.linear, done outside the Function
            x, w, b = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        return _SplitLinear.apply(self.anchor, x, w, b, (weight, bias), self)

    def bias_add(self, y: torch.Tensor, bias: nn.Parameter) -> torch.Tensor:
        """y + bias, with db deferred (a row-parallel layer adds its bias after the reduction)."""
        return _SplitBiasAdd.apply(self.anchor, y, bias.detach(), bias, self)

    def embedding(self, ids: torch.Tensor, weight: nn.Parameter) -> torch.Tensor:
        """F.embedding(ids, weight); all of its backward is W (ids have no gradient)."""
        return _SplitEmbedding.apply(self.anchor, ids, weight.detach(), weight, self)

    def layer_norm(
        self, x: torch.Tensor, weight: nn.Parameter | None, bias: nn.Parameter | None, eps: float
    ) -> torch.Tensor:
        """F.layer_norm over the last dim, with dweight and dbias deferred."""
        return _SplitLayerNorm.apply(self.anchor, x, _detach(weight), _detach(bias), (weight, bias), eps, self)

    def rms_norm(self, x: torch.Tensor, weight: nn.Parameter | None, eps: float | None) -> torch.Tensor:
        """F.rms_norm over the last dim (eps None: finfo(x.dtype).eps), with dweight deferred: the
        normalization without the weight (plain autograd: it has no weights), then the scale."""
        x_hat = F.rms_norm(x, (x.shape[-1],), None, eps)
        return x_hat if weight is None else _SplitScale.apply(self.anchor, x_hat, weight.detach(), weight, self)


def _detach(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.detach()


def _trainable(*params: nn.Parameter | None) -> bool:
    return any(p is not None and p.requires_grad for p in params)


def accumulate(closures: list[Deferred], *, root: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Run the closures inside one autograd pass, which adds their gradients into .grad as a
    plain backward would: AccumulateGrad (in place into the DP buffers), its post-accumulate hooks,
    once per parameter and pass. The pass is a chain of nodes, one per closure, each computing
    its gradients when the engine reaches it, and AccumulateGrad runs as soon as they are ready:
    one layer's weight gradients exist at a time, and each closure's inputs are freed once it
    has run. The chain runs in the order the closures were deferred (the B's order: last layer
    first, as a plain backward fills the gradients). `root` wraps the pass's root as the chunk's
    backward passes are (pretrain/optim.py BackwardRootChunk.weight_root: ZeRO's prologue and
    epilogue for each pass). Empties `closures`."""
    if not closures:
        return
    with torch.enable_grad():
        link = closures[0][0][0].new_zeros(())
        while closures:  # the first deferred ends up at the root: the engine starts there
            params, fn = closures.pop()
            link = _Deferred.apply(link, fn, *params)
        del fn
        if root is not None:
            link = root(link)
    link.backward()


class _Deferred(torch.autograd.Function):
    """One closure's place in a W pass: forward passes the chain's scalar on; backward runs the
    closure and hands each parameter its gradient."""

    @staticmethod
    def forward(ctx, link, fn, *params):
        ctx.fn, ctx.params = fn, params
        return link.clone()

    @staticmethod
    def backward(ctx, grad):
        fn, params, ctx.fn = ctx.fn, ctx.params, None  # dropped: its saved inputs go now
        got = {id(p): g for p, g in fn()}
        link = grad if ctx.needs_input_grad[0] else None
        return (link, None, *(got[id(p)].to(p.dtype) if id(p) in got else None for p in params))


def _linear_grads(x: torch.Tensor, grad: torch.Tensor, weight, bias) -> Grads:
    x2, g2 = _rows(x), _rows(grad)  # [tokens, in], [tokens, out]
    out = [(weight, g2.t() @ x2)] if weight.requires_grad else []
    if bias is not None and bias.requires_grad:
        out.append((bias, g2.sum(0)))
    return out


class _SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, x, w, b, params, store):
        ctx.save_for_backward(x, w)
        ctx.params, ctx.store = params, store
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad_x = grad @ w if ctx.needs_input_grad[1] else None  # [..., out] @ [out, in]
        ctx.store.defer(ctx.params, functools.partial(_linear_grads, x.detach(), grad.detach(), *ctx.params))
        return None, grad_x, None, None, None, None


class _SplitBiasAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, y, b, bias, store):
        ctx.bias, ctx.store = bias, store
        return y + b

    @staticmethod
    def backward(ctx, grad):
        g, bias = grad.detach(), ctx.bias
        ctx.store.defer((bias,), lambda: [(bias, _rows(g).sum(0))])
        return None, grad, None, None, None


def _embedding_grads(ids: torch.Tensor, grad: torch.Tensor, weight: nn.Parameter) -> Grads:
    dense = torch.zeros(weight.shape, dtype=grad.dtype, device=grad.device)
    return [(weight, dense.index_add_(0, ids.reshape(-1), _rows(grad)))]


class _SplitEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, ids, w, weight, store):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.store = weight, store
        return F.embedding(ids, w)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        ctx.store.defer((ctx.weight,), functools.partial(_embedding_grads, ids, grad.detach(), ctx.weight))
        return None, None, None, None, None


class _SplitLayerNorm(torch.autograd.Function):
    """torch's own layer norm kernels (those F.layer_norm runs), its backward in two halves: the
    input gradient in B, the weight and bias gradients in W, from the input and its per-row
    mean and 1/std (what the plain backward keeps too)."""

    @staticmethod
    def forward(ctx, anchor, x, w, b, params, eps, store):
        out, mean, rstd = torch.native_layer_norm(x, [x.shape[-1]], w, b, eps)
        ctx.save_for_backward(x, mean, rstd, w, b)
        ctx.params, ctx.store = params, store
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, w, b = ctx.saved_tensors
        shape = [x.shape[-1]]
        grad_x = None
        if ctx.needs_input_grad[1]:
            only_input = [True, False, False]
            grad_x = torch.ops.aten.native_layer_norm_backward(grad, x, shape, mean, rstd, w, b, only_input)[0]
        weight, bias = ctx.params
        if _trainable(weight, bias):
            mask = [False, weight is not None and weight.requires_grad, bias is not None and bias.requires_grad]
            g, x = grad.detach(), x.detach()

            def w_pass() -> Grads:
                _, dw, db = torch.ops.aten.native_layer_norm_backward(g, x, shape, mean, rstd, w, b, mask)
                return [(p, d) for p, d in ((weight, dw), (bias, db)) if d is not None]

            ctx.store.defer(ctx.params, w_pass)
        return None, grad_x, None, None, None, None, None


class _SplitScale(torch.autograd.Function):
    """x_hat * weight (an RMS norm's scale: F.rms_norm without a weight, then this, is what the
    plain F.rms_norm computes on CPU); W keeps x_hat and the output gradient."""

    @staticmethod
    def forward(ctx, anchor, x_hat, w, weight, store):
        ctx.save_for_backward(x_hat, w)
        ctx.weight, ctx.store = weight, store
        return x_hat * w

    @staticmethod
    def backward(ctx, grad):
        x_hat, w = ctx.saved_tensors
        g, xh, weight = grad.detach(), x_hat.detach(), ctx.weight
        ctx.store.defer((weight,), lambda: [(weight, _rows(g * xh).sum(0))])
        return None, grad * w, None, None, None


def split_weight_gradients(model: nn.Module, store: WeightGradStore) -> None:
    """Make `model`'s layers defer their weight gradients to `store`: torch's own nn.Linear and
    nn.Embedding (what the single-device factory and the GPT's learned positions use) become
    their split subclasses in place (the same objects with everything on them: parameters, state
    dict, anything else a model attached; as FSDP2's fully_shard swaps a module's class); the
    project's layers (norms, tensor-parallel layers, the factory's output layer and loss) take
    the store as their `weight_grads`."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SplitLinear
        elif type(module) is nn.Embedding:
            assert module.padding_idx is None and module.max_norm is None and not module.sparse
            module.__class__ = SplitEmbedding
        if hasattr(module, "weight_grads"):
            module.weight_grads = store
    layers = getattr(model, "layers", None)  # the GPT's layer factory (a plain object)
    if layers is not None and hasattr(layers, "weight_grads"):
        layers.weight_grads = store


class SplitLinear(nn.Linear):
    """nn.Linear whose weight gradients go to a WeightGradStore (split_weight_gradients)."""

    weight_grads: WeightGradStore | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight_grads.linear(x, self.weight, self.bias)


class SplitEmbedding(nn.Embedding):
    """nn.Embedding (no padding_idx, max_norm or sparse: what the model builds) whose weight
    gradient goes to a WeightGradStore (split_weight_gradients)."""

    weight_grads: WeightGradStore | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_grads.embedding(ids, self.weight)
