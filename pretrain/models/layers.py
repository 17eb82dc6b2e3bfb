"""The layer factory: how the model builds the pieces that tensor parallelism shards.

The GPT model is written as if it ran on one device and asks a factory for its linear layers,
its vocabulary embedding and its loss. `DenseLayers` builds plain torch modules; the
tensor-parallel factory (pretrain/parallel/tensor.py) builds column/row-parallel ones with the
same parameter names, so the model code never changes between layouts.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models import kernels
from pretrain.models.sharding import ShardSpec, mark


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state dict) computed by kernels.rms_norm (the fused Triton
    kernel where kernels.use_triton says so, else the PyTorch reference). `weight_grads`: a
    zero-bubble schedule's store (pretrain/models/weight_grads.py), which then gets the weight
    gradient (the split norm runs F.rms_norm's own PyTorch operations, not the Triton kernel)."""

    weight_grads = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_grads is not None:
            return self.weight_grads.rms_norm(x, self.weight, self.eps)
        return kernels.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed by kernels.layer_norm (`weight_grads`: as RMSNorm's)."""

    weight_grads = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_grads is not None:
            return self.weight_grads.layer_norm(x, self.weight, self.bias, self.eps)
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


def make_norm(config) -> nn.Module:
    """LayerNorm (gpt2) or RMSNorm (llama) over the hidden size."""
    if config.flavour == "llama":
        return RMSNorm(config.hidden_size, eps=config.norm_eps)
    return LayerNorm(config.hidden_size, eps=config.norm_eps)


def _with_specs(module: nn.Module, **specs: ShardSpec) -> nn.Module:
    for name, spec in specs.items():
        param = getattr(module, name)
        if param is not None:
            mark(param, tp=spec)
    return module


class DenseLayers:
    """Single-device layers (tensor-parallel size 1). `context`: the context-parallel group's
    operations (pretrain/parallel/context.py's ContextParallel) when the sequence is split over
    ranks, else None."""

    tp_size = 1
    tp_rank = 0
    sequence_parallel = False
    # A zero-bubble schedule's store (pretrain/models/weight_grads.py): the fused output layer's
    # weight gradient is deferred to it (the other layers get it themselves).
    weight_grads = None

    def __init__(self, context=None) -> None:
        self.context = context

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
        return _with_specs(
            nn.Linear(in_features, out_features, bias=bias), weight=ShardSpec(0, stacked), bias=ShardSpec(0, stacked)
        )

    def row(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        """A linear layer whose input dimension TP splits (output is reduced across TP)."""
        return _with_specs(nn.Linear(in_features, out_features, bias=bias), weight=ShardSpec(1))

    def embedding(self, rows: int, dim: int) -> nn.Module:
        """The token embedding; TP splits its rows (the vocabulary)."""
        return _with_specs(nn.Embedding(rows, dim), weight=ShardSpec(0))

    def output_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden [b, s, h] x weight [vocab, h] -> logits [b, s, vocab] (vocab local under TP)."""
        return F.linear(hidden, weight) if self.weight_grads is None else self.weight_grads.linear(hidden, weight, None)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits from this rank's output (identity on one device)."""
        return logits

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int) -> torch.Tensor:
        """Mean cross-entropy over labels != -100, computed in fp32, over the first vocab_size
        logits: padding rows never enter the softmax, so the loss does not depend on how far the
        vocabulary was padded (which changes with the TP size). With Triton the logits' gradient
        is written over them."""
        return kernels.cross_entropy(logits, labels, vocab_size=vocab_size, inplace_backward=True, reduction="mean")

    def linear_cross_entropy(self, hidden, weight, labels, *, vocab_size: int, scratch=None) -> torch.Tensor:
        """cross_entropy(output_logits(hidden, weight), labels), fused so that the [tokens, vocab]
        logits are allocated once (on CPU kept in `scratch` between steps)."""
        return kernels.linear_cross_entropy(
            hidden, weight, labels, vocab_size=vocab_size, scratch=scratch, weight_grads=self.weight_grads
        )
