"""One decoder-only GPT in two flavours, written as if it ran on one device.

- gpt2: learned positions, LayerNorm, GeLU (tanh) MLP, biases, tied input/output embedding.
- llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied output.

Tensor parallelism swaps the layers the factory builds (pretrain/models/layers.py); pipeline
parallelism runs `embed`, slices of `blocks` and `head` on different ranks. Nothing here knows
about either beyond `layers.tp_size`, which divides the heads a rank holds.

Fused QKV layout: output rows are grouped per key/value head as [q x (heads/kv_heads), k, v],
each head_dim wide, so splitting the rows into TP contiguous chunks gives every rank whole
groups (grouped-query attention included) and no reshuffle is needed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.config import ModelConfig
from pretrain.models.attention import causal_attention
from pretrain.models.layers import DenseLayers


def rope_tables(*, positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [positions, head_dim] in the rotate-half (GPT-NeoX / HF Llama) convention."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, s, d]; cos/sin: [s, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.flavour == "llama":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layers) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.heads = config.num_heads // layers.tp_size  # heads held by this rank
        self.kv_heads = config.kv_heads // layers.tp_size
        self.dropout = config.dropout
        self.selective_checkpoint = config.activation_checkpointing == "selective"
        bias = config.flavour == "gpt2"
        qkv_out = (config.num_heads + 2 * config.kv_heads) * self.head_dim
        self.qkv = layers.column(config.hidden_size, qkv_out, bias=bias)
        self.proj = layers.row(config.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        b, s, _ = x.shape
        group = self.heads // self.kv_heads
        qkv = self.qkv(x).view(b, s, self.kv_heads, group + 2, self.head_dim)
        q = qkv[:, :, :, :group].reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = qkv[:, :, :, group].transpose(1, 2)  # [b, kv_heads, s, d]
        v = qkv[:, :, :, group + 1].transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.selective_checkpoint and self.training:
            out = checkpoint(self._core, q, k, v, use_reentrant=False)
        else:
            out = self._core(q, k, v)
        # [b, heads, s, d] -> [b, s, heads * d]
        return self.proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layers) -> None:
        super().__init__()
        self.swiglu = config.flavour == "llama"
        bias = not self.swiglu
        parts = 2 if self.swiglu else 1  # SwiGLU: fc1 holds [gate; up]
        self.fc1 = layers.column(config.hidden_size, parts * config.ffn_size, bias=bias, stacked=parts)
        self.fc2 = layers.row(config.ffn_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc2(h)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layers) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config, layers)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config, layers)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), rope))
        return x + self.dropout(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """`model(tokens)` -> logits [b, s, vocab_size]; `model(tokens, labels=labels)` -> mean loss."""

    def __init__(self, config: ModelConfig, *, layers=None) -> None:
        super().__init__()
        self.config = config
        self.layers = layers or DenseLayers()
        self.full_checkpoint = config.activation_checkpointing == "full"
        self.embed = self.layers.embedding(config.vocab_rows, config.hidden_size)
        self.pos_embed = nn.Embedding(config.positions, config.hidden_size) if config.flavour == "gpt2" else None
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, self.layers) for _ in range(config.num_layers))
        self.final_norm = make_norm(config)
        self.head = None if config.tied else self.layers.column(config.hidden_size, config.vocab_rows, bias=False)
        if config.flavour == "llama":
            cos, sin = rope_tables(positions=config.positions, head_dim=config.head_dim,
                                   theta=config.rope_theta)
            # Not persistent: derived from config, so checkpoints hold only learned weights.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Megatron init: N(0, std) everywhere, output projections N(0, std / sqrt(2 layers))."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name:
                param.fill_(1.0)
            elif name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                param.normal_(0.0, out_std)
            else:
                param.normal_(0.0, std)

    # The three pieces a pipeline stage runs; forward() chains them on one device.
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> hidden [b, s, h]."""
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(tokens.shape[1], device=tokens.device))
        return self.embed_dropout(x)

    def run_blocks(self, x: torch.Tensor, blocks=None) -> torch.Tensor:
        s = x.shape[1]
        rope = (self.rope_cos[:s], self.rope_sin[:s]) if self.pos_embed is None else None
        for block in self.blocks if blocks is None else blocks:
            if self.full_checkpoint and self.training:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return x

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """hidden [b, s, h] -> logits [b, s, padded vocab] (this rank's share under TP)."""
        weight = self.embed.weight if self.head is None else self.head.weight
        return self.layers.output_logits(self.final_norm(x), weight)

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if tokens.shape[1] > self.config.positions:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than the model's "
                             f"{self.config.positions} positions")
        logits = self.head_logits(self.run_blocks(self.embed_tokens(tokens)))
        if labels is not None:
            return self.layers.cross_entropy(logits, labels)
        return self.layers.gather_logits(logits)[..., : self.config.vocab_size]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
