"""Fused kernels for the GPT hot loop, each with a PyTorch reference version.

    rms_norm(x, weight, eps)              == F.rms_norm over the last dim
    layer_norm(x, weight, bias, eps)      == F.layer_norm over the last dim
    swiglu(h)                             h [..., 2f] = [gate; up] -> silu(gate) * up [..., f]
    apply_rope_(q, k, cos, sin)           rotate-half RoPE in place on q, k; returns (q, k)
    apply_rope(q, k, cos, sin)            the same into new tensors (q, k untouched)
    cross_entropy(logits, labels, *, vocab_start, vocab_size, group, inplace_backward, reduction)
                                          per-token (or mean) loss, vocab-parallel over `group`
    linear_cross_entropy(hidden, weight, labels, *, vocab_size, scratch)
                                          the output layer fused with the mean loss (one device)

Every function takes fp32 or bf16 (fp16 runs the same code, untested), computes in fp32 and returns the input's dtype
(cross_entropy returns fp32), supports autograd, any leading shape and any last-dim width.

Which version runs: the Triton kernel when `use_triton(x)` (x on CUDA and triton importable),
else the PyTorch reference (norms over rows wider than MAX_NORM_WIDTH always take it).
Environment `PRETRAIN_KERNELS=torch` forces the reference; `PRETRAIN_KERNELS=triton` forces
Triton, on CPU too, where it needs `TRITON_INTERPRET=1` set before triton is first imported
(correctness checks only: the interpreter is slow).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch
import torch.nn.functional as F

from pretrain.models.kernels import reference
from pretrain.models.loss import IGNORE_INDEX, LinearCrossEntropy

# Norm rows wider than this run the reference: the Triton norms hold a row in registers.
MAX_NORM_WIDTH = 8192

__all__ = [
    "apply_rope",
    "apply_rope_",
    "cross_entropy",
    "layer_norm",
    "linear_cross_entropy",
    "rms_norm",
    "swiglu",
    "triton_available",
    "use_triton",
]


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    mode = os.environ.get("PRETRAIN_KERNELS", "auto").lower()
    if mode == "torch":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError(
                "PRETRAIN_KERNELS=triton but triton is not importable: pip install -c constraints.txt -e '.[kernels]'"
            )
        return True
    if mode != "auto":
        raise ValueError(f"PRETRAIN_KERNELS={mode!r}: expected 'auto', 'torch' or 'triton'")
    # Inside a torch.compile'd region (model.compile) inductor fuses the torch ops itself; a
    # hand-written kernel there would only cut its fusion graph.
    return x.is_cuda and triton_available() and not torch.compiler.is_compiling()


def _triton(module: str):
    # Imported on first use only: importing triton costs seconds, and the CPU path never needs it.
    return importlib.import_module(f"pretrain.models.kernels.{module}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None = None) -> torch.Tensor:
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * weight (eps=None: finfo(x.dtype).eps,
    as F.rms_norm). weight [N] (or None) gets its gradient summed over all rows."""
    if not use_triton(x) or x.shape[-1] > MAX_NORM_WIDTH:
        # torch's own fused op (it saves the input and one statistic per row for backward; the
        # fp32 reference would keep every intermediate: +4 bytes per token and hidden unit).
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return _triton("triton_norms").rms_norm(x, weight, torch.finfo(x.dtype).eps if eps is None else eps)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dim (biased variance, as F.layer_norm)."""
    if not use_triton(x) or x.shape[-1] > MAX_NORM_WIDTH:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)  # torch's own fused op
    return _triton("triton_norms").layer_norm(x, weight, bias, eps)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h [..., 2f] holding [gate; up] along the last dim (the MLP's fc1 output) ->
    silu(gate) * up [..., f]."""
    if not use_triton(h):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up  # in h's dtype: no fp32 copies kept for backward
    return _triton("triton_swiglu").swiglu(h)


def apply_rope_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE (as gpt.apply_rope) applied in place to q [b, heads, s, d] and
    k [b, kv_heads, s, d]; cos/sin [>= s, d] from gpt.rope_tables. Returns (q, k).

    Any strides are fine (the QKV split's views are read and written where they lie). Autograd
    rules for in-place ops hold: with grad enabled q and k must not be leaves that require grad,
    nor views made by a multi-output op (split/chunk/unbind: PyTorch refuses in-place changes to
    those; make them with narrow or indexing instead), nor tensors another op saved for its
    backward. Backward applies the inverse rotation to the incoming gradients.
    """
    if not use_triton(q):
        return reference.apply_rope_(q, k, cos, sin)
    return _triton("triton_rope").apply_rope_(q, k, cos, sin)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE as apply_rope_, into new tensors: no autograd restrictions on q and k, same bytes
    moved (one read, one write of q and k)."""
    if not use_triton(q):
        return _rope_torch(q, cos, sin), _rope_torch(k, cos, sin)
    return _triton("triton_rope").apply_rope(q, k, cos, sin)


def _rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """reference.rope without its fp32 copy of x: the products with the fp32 tables are fp32
    anyway (type promotion), and the rotated half stays in x's dtype."""
    s = x.shape[-2]
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos[:s] + torch.cat([-x2, x1], dim=-1) * sin[:s]).to(x.dtype)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    group=None,
    inplace_backward: bool = False,
    reduction: str = "none",
) -> torch.Tensor:
    """Per-token cross-entropy [*labels.shape] fp32 of logits [..., V_local] (labels [...]), or
    with reduction="mean" its mean over the labels != -100 (0 when there are none).

    The logits are this rank's vocabulary slice, columns vocab_start .. vocab_start + V_local of
    the global vocabulary; columns at global id >= vocab_size are padding, left out of the
    softmax and given zero gradient. Labels == -100 give loss 0 and zero gradient. With `group`
    (a torch.distributed process group of the tensor-parallel ranks) the softmax spans all
    ranks' slices: only [N]-sized tensors are all-reduced (a MAX, then one SUM of [2, N]).

    The Triton version keeps per-row (max, sum-exp, target logit) only and recomputes the
    softmax in backward; with `inplace_backward=True` it writes the logits' gradient over the
    logits themselves (the caller must not use them after backward, and nothing else may have
    saved them: true of F.linear's output). The reference materialises fp32 logits and ignores
    `inplace_backward`.
    """
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction={reduction!r}: expected 'none' or 'mean'")
    impl = _triton("triton_cross_entropy") if use_triton(logits) else reference
    per_token = impl.cross_entropy(
        logits, labels, vocab_start=vocab_start, vocab_size=vocab_size, group=group, inplace_backward=inplace_backward
    )
    if reduction == "none":
        return per_token
    # clamp: a micro-batch whose labels are all ignored contributes 0, not 0/0.
    return per_token.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    scratch=None,
    weight_grads=None,
) -> torch.Tensor:
    """Mean cross_entropy(hidden @ weight[:vocab_size].T, labels) over labels != -100, the output
    layer fused with its loss: hidden [..., h], weight [padded vocab, h], labels [...].

    Triton: the logits stay in the matmul's dtype (bf16 under autocast; the kernel computes in
    fp32) and their gradient is written over them. Elsewhere pretrain/models/loss.py's
    LinearCrossEntropy, which allocates the [tokens, vocab] fp32 logits once (on CPU kept in
    `scratch`, a loss.ScratchBuffer, between steps). `weight_grads`: a zero-bubble schedule's
    store (pretrain/models/weight_grads.py); the weight's gradient is then deferred to it, by
    LinearCrossEntropy on every device (the Triton loss has no split backward).
    """
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    if weight_grads is not None:
        deferred = (weight_grads, weight)
        return LinearCrossEntropy.apply(
            hidden, weight.detach(), labels, IGNORE_INDEX, vocab_size, scratch, deferred, weight_grads.anchor
        )
    if not use_triton(hidden):
        return LinearCrossEntropy.apply(hidden, weight, labels, IGNORE_INDEX, vocab_size, scratch)
    logits = torch.nn.functional.linear(hidden, weight[:vocab_size])
    return cross_entropy(logits, labels, inplace_backward=True, reduction="mean")
