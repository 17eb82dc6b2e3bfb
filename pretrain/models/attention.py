"""Attention core: softmax(QK^T / sqrt(d)) V with a causal mask.

The default backend is torch's `scaled_dot_product_attention`, which dispatches to
FlashAttention / cuDNN on GPU and to a fused flash kernel on CPU. Grouped-query attention is
passed through as `enable_gqa` so K/V are never copied per query head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     dropout_p: float = 0.0, causal: bool = True) -> torch.Tensor:
    """q: [b, heads, s, d]; k, v: [b, kv_heads, s, d] -> [b, heads, s, d]. `causal=False`
    attends in both directions (masked-LM)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p,
                                          enable_gqa=k.shape[1] != q.shape[1])
