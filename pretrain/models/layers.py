"""The layer factory: how the model builds the pieces that tensor parallelism shards.

The GPT model is written as if it ran on one device and asks a factory for its linear layers,
its vocabulary embedding and its loss. `DenseLayers` builds plain torch modules; the
tensor-parallel factory (pretrain/parallel/tensor.py) builds column/row-parallel ones with the
same parameter names, so the model code never changes between layouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class DenseLayers:
    """Single-device layers (tensor-parallel size 1)."""

    tp_size = 1

    def column(self, in_features: int, out_features: int, *, bias: bool, stacked: int = 1) -> nn.Module:
        """A linear layer whose output dimension TP splits. `stacked` says the output is that
        many equal parts (SwiGLU gate|up) that TP must split one by one."""
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        """A linear layer whose input dimension TP splits (output is reduced across TP)."""
        return nn.Linear(in_features, out_features, bias=bias)

    def embedding(self, rows: int, dim: int) -> nn.Module:
        """The token embedding; TP splits its rows (the vocabulary)."""
        return nn.Embedding(rows, dim)

    def output_logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden [b, s, h] x weight [vocab, h] -> logits [b, s, vocab] (vocab local under TP)."""
        return F.linear(hidden, weight)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits from this rank's output (identity on one device)."""
        return logits

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over labels != IGNORE_INDEX, computed in fp32."""
        # [b, s, V] -> [b*s, V]; fp32 because bf16 log-softmax over a large vocabulary drifts.
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                               ignore_index=IGNORE_INDEX)
