"""The layer factory: how the model builds the pieces that tensor parallelism shards.

The GPT model is written as if it ran on one device and asks a factory for its linear layers,
its vocabulary embedding and its loss. `DenseLayers` builds plain torch modules; the
tensor-parallel factory (pretrain/parallel/tensor.py) builds column/row-parallel ones with the
same parameter names, so the model code never changes between layouts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models import kernels

IGNORE_INDEX = -100


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state dict), running the fused Triton kernel where
    kernels.use_triton says so and torch's own op otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.use_triton(x):
            return kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.use_triton(x):
            return kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


def make_norm(config) -> nn.Module:
    """LayerNorm (gpt2) or RMSNorm (llama) over the hidden size."""
    if config.flavour == "llama":
        return RMSNorm(config.hidden_size, eps=config.norm_eps)
    return LayerNorm(config.hidden_size, eps=config.norm_eps)


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter is split across tensor-parallel ranks: along `dim`, each of `parts`
    stacked blocks (SwiGLU's [gate; up] has 2) split separately so every rank holds a slice of
    each. Attached to a parameter as `param.tp_spec`; a parameter without one is replicated."""

    dim: int
    parts: int = 1


def shard_tensor(full: torch.Tensor, spec: ShardSpec, *, rank: int, size: int) -> torch.Tensor:
    """This rank's slice of a full tensor."""
    blocks = full.chunk(spec.parts, dim=spec.dim)
    return torch.cat([b.chunk(size, dim=spec.dim)[rank] for b in blocks], dim=spec.dim)


def unshard_tensors(shards: list[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """The full tensor from every rank's slice, in rank order (inverse of shard_tensor)."""
    per_rank = [s.chunk(spec.parts, dim=spec.dim) for s in shards]
    return torch.cat([torch.cat([p[i] for p in per_rank], dim=spec.dim) for i in range(spec.parts)],
                     dim=spec.dim)


def full_shape(param: torch.Tensor, tp_size: int) -> torch.Size:
    """The unsharded shape of a (possibly TP-sharded) parameter."""
    spec = getattr(param, "tp_spec", None)
    if spec is None:
        return param.shape
    shape = list(param.shape)
    shape[spec.dim] *= tp_size
    return torch.Size(shape)


def _with_specs(module: nn.Module, **specs: ShardSpec) -> nn.Module:
    for name, spec in specs.items():
        param = getattr(module, name)
        if param is not None:
            param.tp_spec = spec
    return module


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T`, with the fp32 logits buffer reused in place.

    The same function as `F.cross_entropy(F.linear(hidden, weight).float(), labels)`, but the
    unfused pair allocates and fills three [tokens, vocab] fp32 buffers per step (log-softmax
    output, NLL-backward zeros, log-softmax-backward output); at GPT vocabularies these dominate
    everything but the matmuls. Here the logits buffer, which nothing outside sees, becomes
    exp(logits - max) in forward and the logits gradient in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, vocab_size):
        # hidden [N, h], weight [V padded, h], labels [N]; only the first vocab_size rows count.
        device = hidden.device.type
        ctx.dtypes, ctx.rows = (hidden.dtype, weight.dtype), weight.shape[0]
        ctx.autocast_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        weight = weight[:vocab_size]  # a view: padding rows are neither multiplied nor differentiated
        if ctx.autocast_dtype is not None:  # what autocast does to F.linear, done by hand
            hidden, weight = hidden.to(ctx.autocast_dtype), weight.to(ctx.autocast_dtype)
        logits = F.linear(hidden, weight).float()  # [N, V] fp32, a fresh buffer owned here
        valid = labels != ignore_index
        target = labels.masked_fill(~valid, 0)
        target_logit = logits.gather(1, target[:, None]).squeeze(1)
        row_max = logits.amax(dim=1, keepdim=True)
        exps = logits.sub_(row_max).exp_()  # logits is overwritten from here on
        sumexp = exps.sum(dim=1)
        count = valid.sum()
        loss = ((sumexp.log() + row_max.squeeze(1) - target_logit) * valid).sum() / count
        ctx.save_for_backward(hidden, weight, exps, sumexp, target, valid, count)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("the fused linear cross-entropy backward runs once (its saved buffer "
                               "becomes the gradient); for retain_graph use "
                               "layers.cross_entropy(layers.output_logits(...), labels, vocab_size=...)")
        ctx.used = True
        hidden, weight, exps, sumexp, target, valid, count = ctx.saved_tensors
        per_row = grad_loss / count * valid  # [N]; 0 on ignored rows
        # d loss / d logits = (softmax - onehot(target)) * per_row, written over exps.
        grad = exps.mul_((per_row / sumexp)[:, None])
        grad[torch.arange(grad.shape[0], device=grad.device), target] -= per_row
        if ctx.autocast_dtype is not None:
            grad = grad.to(ctx.autocast_dtype)
        grad_hidden = (grad @ weight).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # Straight into a buffer of the padded shape (padding rows zero): slicing the weight
            # outside would cost a zero-filled [V padded, h] buffer and a copy into it.
            vocab = weight.shape[0]
            grad_weight = torch.empty((ctx.rows, hidden.shape[1]), dtype=ctx.dtypes[1], device=hidden.device)
            if grad.dtype == grad_weight.dtype:
                torch.mm(grad.t(), hidden, out=grad_weight[:vocab])
            else:
                grad_weight[:vocab] = grad.t() @ hidden
            grad_weight[vocab:].zero_()
        return grad_hidden, grad_weight, None, None, None


class DenseLayers:
    """Single-device layers (tensor-parallel size 1)."""

    tp_size = 1
    tp_rank = 0
    sequence_parallel = False

    def norm(self, config) -> nn.Module:
        return make_norm(config)

    def enter_sequence_parallel(self, x: torch.Tensor) -> torch.Tensor:
        """After the embedding; sequence parallelism keeps only this rank's chunk."""
        return x

    def rng_region(self):
        """Context for dropout inside a TP region (TP gives each rank its own stream)."""
        return contextlib.nullcontext()

    # The shard specs are attached on one device too, so that a checkpoint of any layout says
    # how each tensor splits and can be loaded at another tensor-parallel size.
    def column(self, in_features: int, out_features: int, *, bias: bool, stacked: int = 1) -> nn.Module:
        """A linear layer whose output dimension TP splits. `stacked` says the output is that
        many equal parts (SwiGLU gate|up) that TP must split one by one."""
        return _with_specs(nn.Linear(in_features, out_features, bias=bias), weight=ShardSpec(0, stacked),
                           bias=ShardSpec(0, stacked))

    def row(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        """A linear layer whose input dimension TP splits (output is reduced across TP)."""
        return _with_specs(nn.Linear(in_features, out_features, bias=bias), weight=ShardSpec(1))

    def embedding(self, rows: int, dim: int) -> nn.Module:
        """The token embedding; TP splits its rows (the vocabulary)."""
        return _with_specs(nn.Embedding(rows, dim), weight=ShardSpec(0))

    def output_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden [b, s, h] x weight [vocab, h] -> logits [b, s, vocab] (vocab local under TP)."""
        return F.linear(hidden, weight)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits from this rank's output (identity on one device)."""
        return logits

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int) -> torch.Tensor:
        """Mean cross-entropy over labels != IGNORE_INDEX, computed in fp32, over the first
        vocab_size logits: padding rows never enter the softmax, so the loss does not depend
        on how far the vocabulary was padded (which changes with the TP size)."""
        if kernels.use_triton(logits):
            # Fused: fp32 inside, bf16 logits in; the gradient is written over the logits.
            per_token = kernels.cross_entropy(logits.flatten(0, 1), labels.flatten(), vocab_size=vocab_size,
                                              inplace_backward=True)
            return per_token.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)
        # [b, s, V] -> [b*s, V]; fp32 because bf16 log-softmax over a large vocabulary drifts.
        return F.cross_entropy(logits[..., :vocab_size].float().flatten(0, 1), labels.flatten(),
                               ignore_index=IGNORE_INDEX)

    def linear_cross_entropy(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             vocab_size: int) -> torch.Tensor:
        """cross_entropy(output_logits(hidden, weight), labels), fused so the [tokens, vocab]
        logits are allocated once: hidden [b, s, h], weight [padded vocab, h], labels [b, s]."""
        if kernels.use_triton(hidden):
            # The logits stay in the matmul's dtype (bf16 under autocast; _LinearCrossEntropy keeps
            # an fp32 copy), and their gradient is written over them.
            logits = F.linear(hidden.flatten(0, 1), weight[:vocab_size])
            per_token = kernels.cross_entropy(logits, labels.flatten(), inplace_backward=True)
            return per_token.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)
        return _LinearCrossEntropy.apply(hidden.flatten(0, 1), weight, labels.flatten(), IGNORE_INDEX, vocab_size)
