"""One decoder-only GPT in two flavours, written as if it ran on one device.

- gpt2: learned positions, LayerNorm, GeLU (tanh) MLP, biases, tied input/output embedding.
- llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied output.

Tensor parallelism swaps the layers the factory builds (pretrain/models/layers.py); pipeline
parallelism runs `embed`, slices of `blocks` and `head` on different ranks. Nothing here knows
about either beyond `layers.tp_size`, which divides the heads a rank holds. Context parallelism
is the factory's `context` (None on one device; pretrain/parallel/context.py): given the full
sequence, the model keeps this rank's tokens at their global positions, its attention crosses
the context-parallel ranks, and its loss is this rank's share.

Fused QKV layout: output rows are grouped per key/value head as [q x (heads/kv_heads), k, v],
each head_dim wide, so splitting the rows into TP contiguous chunks gives every rank whole
groups (grouped-query attention included) and no reshuffle is needed.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.config import ModelConfig
from pretrain.config.model import RopeScaling
from pretrain.models import kernels
from pretrain.models.attention import Documents, attention
from pretrain.models.layers import DenseLayers
from pretrain.models.loss import ScratchBuffer
from pretrain.models.moe import MoE
from pretrain.models.rope import rope_inv_freq
from pretrain.models.sharding import full_shape, mark, shard_tensor, sharding


def rope_tables(
    *, positions: int, head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [positions, head_dim] in the rotate-half (GPT-NeoX / HF Llama) convention;
    `scaling`: model.rope_scaling (Llama 3's long-context frequencies), None for plain RoPE."""
    inv_freq = rope_inv_freq(head_dim=head_dim, theta=theta, scaling=scaling)
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layers) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.heads = config.num_heads // layers.tp_size  # heads held by this rank
        self.kv_heads = config.kv_heads // layers.tp_size
        self.dropout = config.dropout
        self.selective_checkpoint = config.activation_checkpointing == "selective"
        self.rng_region = layers.rng_region
        self.causal = not config.bidirectional
        self.backend = config.attention_backend
        self.context = getattr(layers, "context", None)
        bias = config.flavour == "gpt2"
        qkv_out = (config.num_heads + 2 * config.kv_heads) * self.head_dim
        # model.qkv_bias (Qwen2): a bias on Q/K/V only, split over TP with the weight's rows.
        self.qkv = layers.column(config.hidden_size, qkv_out, bias=bias or config.qkv_bias)
        self.proj = layers.row(config.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents | None) -> torch.Tensor:
        if self.context is not None:  # `documents` is then its LocalSequence (see run_blocks)
            dropout_p = self.dropout if self.training else 0.0
            return self.context.attention(q, k, v, documents, dropout_p=dropout_p, backend=self.backend)
        return attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            causal=self.causal,
            segments=documents,
            backend=self.backend,
        )

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, documents: Documents | None = None
    ) -> torch.Tensor:
        # [b, s, (heads + 2 kv_heads) * d]; s is the full sequence under SP (this CP rank's share of it)
        qkv = self.qkv(x)
        b, s, _ = qkv.shape
        group = self.heads // self.kv_heads
        qkv = qkv.view(b, s, self.kv_heads, group + 2, self.head_dim)
        # split, not three index selects: its backward is one cat into the qkv gradient instead
        # of three zero-filled qkv-sized buffers summed.
        q, k, v = qkv.split([group, 1, 1], dim=3)
        q = q.reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = k.squeeze(3).transpose(1, 2)  # [b, kv_heads, s, d]
        v = v.squeeze(3).transpose(1, 2)
        if rope is not None:
            q, k = kernels.apply_rope(q, k, *rope)  # Triton reads the split's views where they lie
        # Dropout on this rank's heads draws from the TP-rank stream; entered outside the
        # checkpoint so that recomputation replays the same mask.
        with self.rng_region() if self.dropout and self.training else contextlib.nullcontext():
            if self.selective_checkpoint and self.training:
                out = checkpoint(self._core, q, k, v, documents, use_reentrant=False)
            else:
                out = self._core(q, k, v, documents)
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
            h = kernels.swiglu(h)  # [..., 2f/tp] = [gate; up] of this rank -> [..., f/tp]
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc2(h)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layers, layer_id: int = 0) -> None:
        super().__init__()
        self.norm1 = layers.norm(config)
        self.attn = Attention(config, layers)
        self.norm2 = layers.norm(config)
        moe = config.moe is not None and config.moe.is_moe_layer(layer_id)
        self.mlp = MoE(config, layers) if moe else MLP(config, layers)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope=None, documents: Documents | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), rope, documents))
        return x + self.dropout(self.mlp(self.norm2(x)))


@dataclass(frozen=True)
class Stage:
    """The part of the model one pipeline (virtual) stage builds: a slice of the layers, plus the
    embedding on the first stage and the final norm, output layer and loss on the last."""

    layer_ids: range
    first: bool
    last: bool

    def holds_embedding(self, tied: bool) -> bool:
        """The input embedding, or (tied) the last stage's copy of it for the output layer."""
        return self.first or (self.last and tied)

    def holds(self, name: str, *, tied: bool) -> bool:
        """Whether GPT(stage=self) has parameter `name` (a name of the whole model's)."""
        if name.startswith("blocks."):
            return int(name.split(".", 2)[1]) in self.layer_ids
        if name.startswith("embed."):
            return self.holds_embedding(tied)
        if name.startswith("pos_embed."):
            return self.first
        return self.last  # final norm, output layer


class GPT(nn.Module):
    """`model(tokens)` -> logits [b, s, vocab_size]; `model(tokens, labels=labels)` -> mean loss.

    `layers` is the layer factory (tensor parallelism swaps it); `stage` builds one pipeline
    stage instead of the whole model. Blocks are keyed by their global index, so a parameter
    has the same name (and the same initial value) in every parallel layout.
    """

    def __init__(
        self, config: ModelConfig, *, layers=None, stage: Stage | None = None, init_seed: int | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.layers = layers or DenseLayers()
        self.stage = stage or Stage(range(config.num_layers), first=True, last=True)
        first, last = self.stage.first, self.stage.last
        self.full_checkpoint = config.activation_checkpointing == "full"
        # The last stage of a pipelined tied model keeps its own copy of the embedding for the
        # output layer; the two copies are kept equal by summing their gradients.
        needs_embed = self.stage.holds_embedding(config.tied)
        self.embed = self.layers.embedding(config.vocab_rows, config.hidden_size) if needs_embed else None
        if needs_embed and not (first and last) and config.tied:
            mark(self.embed.weight, tied_embedding=True, tied_output_copy=not first)
        use_positions = first and config.flavour == "gpt2"
        self.pos_embed = nn.Embedding(config.positions, config.hidden_size) if use_positions else None
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(config, self.layers, i) for i in self.stage.layer_ids})
        self.final_norm = self.layers.norm(config) if last else None
        self.head = None
        # The fused loss's [tokens, vocab] buffer, kept between steps on CPU (see ScratchBuffer).
        self.loss_scratch = ScratchBuffer() if last else None
        if last and not config.tied:
            self.head = self.layers.column(config.hidden_size, config.vocab_rows, bias=False)
        self.make_buffers()
        self.reset_parameters(seed=init_seed)
        if config.compile:
            # In place (nn.Module.compile): parameter names, and so checkpoints, stay the same.
            for block in self.blocks.values():
                block.compile()

    def make_buffers(self) -> None:
        """The buffers derived from the config (RoPE tables), on the default device. Not
        persistent: checkpoints hold only learned weights."""
        if self.config.flavour == "llama":
            shape = (self.config.positions, self.config.head_dim)
            if torch.get_default_device().type == "meta":  # shapes only: no float64 math on meta
                cos, sin = torch.empty(shape), torch.empty(shape)
            else:
                cos, sin = rope_tables(
                    positions=shape[0],
                    head_dim=shape[1],
                    theta=self.config.rope_theta,
                    scaling=self.config.rope_scaling,
                )
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Megatron init: N(0, std) everywhere, output projections N(0, std / sqrt(2 layers)).

        Each weight is drawn whole from a generator seeded by (seed, its name), then this rank's
        shard is kept, so every TP/PP layout starts from exactly the single-device weights. The
        default seed is drawn from torch's global generator (torch.manual_seed decides it).
        A model built on the meta device is left as it is: pretrain/models/build.py fills it
        parameter by parameter on its real device (`initial_value`, the same values).
        """
        if any(p.is_meta for p in self.parameters()):
            return
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        for name, param in self.named_parameters():
            param.copy_(self.initial_value(name, param, seed=seed, device=param.device))

    @torch.no_grad()
    def initial_value(self, name: str, param: torch.Tensor, *, seed: int, device: torch.device) -> torch.Tensor:
        """Parameter `name`'s initial value (this rank's shard), fp32 on `device`; see reset_parameters."""
        if name.endswith("bias"):
            return torch.zeros(param.shape, device=device)
        if "norm" in name:
            return torch.ones(param.shape, device=device)
        std = self.config.init_std
        scale = (
            std / math.sqrt(2 * self.config.num_layers)
            if name.endswith(("attn.proj.weight", "fc2.weight"))  # MoE experts' too
            else std
        )
        generator = torch.Generator(device=device).manual_seed(seed + zlib.crc32(name.encode()))
        full = torch.empty(full_shape(param, self.layers.tp_size), device=device)
        full.normal_(0.0, scale, generator=generator)
        spec = sharding(param).tp
        return full if spec is None else shard_tensor(full, spec, rank=self.layers.tp_rank, size=self.layers.tp_size)

    # The three pieces a pipeline stage runs; forward() chains them on one device.
    def _positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        """Global positions [local_len] of the tokens this rank holds (all of them without CP)."""
        context = getattr(self.layers, "context", None)
        if context is None:
            return torch.arange(local_len, device=device)
        return context.positions(local_len * context.size, device=device)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> hidden [b, s, h] (context parallelism: [b, s/cp, h], this rank's tokens)."""
        context = getattr(self.layers, "context", None)
        if context is not None:
            tokens = context.local(tokens)
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(self._positions(tokens.shape[1], tokens.device))
        x = self.layers.enter_sequence_parallel(x)  # [b, s/tp, h] under sequence parallelism
        return self.embed_dropout(x)

    def run_blocks(self, x: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [b, s(/tp), h] -> hidden; `segments` [b, s]: document numbers (attention stays
        within a document), or None. Under context parallelism hidden holds this rank's s/cp
        tokens and `segments` is the full sequence's."""
        # RoPE tables for the full sequence: attention runs on whole sequences even under
        # sequence parallelism (the QKV projection gathers them).
        s = x.shape[1] * (self.layers.tp_size if self.layers.sequence_parallel else 1)
        context = getattr(self.layers, "context", None)
        causal = not self.config.bidirectional
        rope = None
        if self.config.flavour == "llama":
            if context is None:
                rope = (self.rope_cos[:s], self.rope_sin[:s])
            else:  # the rows of this rank's tokens' global positions
                at = self._positions(s, x.device)
                rope = (self.rope_cos[at], self.rope_sin[at])
        # The documents' mask or offsets, once for all layers (see Documents); under context
        # parallelism the masks of this rank's queries against every rank's keys.
        if context is not None:
            documents = context.prepare(segments, seq_len=s * context.size, causal=causal, device=x.device)
        elif segments is not None:
            documents = Documents.of(segments, backend=self.config.attention_backend, causal=causal)
        else:
            documents = None
        for block in self.blocks.values():
            if self.full_checkpoint and self.training:
                x = checkpoint(block, x, rope, documents, use_reentrant=False)
            else:
                x = block(x, rope, documents)
        return x

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """hidden [b, s, h] -> logits [b, s, padded vocab] (this rank's share under TP)."""
        weight = self.embed.weight if self.head is None else self.head.weight
        return self.layers.output_logits(self.final_norm(x), weight)

    def head_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """hidden [b, s, h], labels [b, s] -> mean cross-entropy: `cross_entropy(head_logits(x))`
        over the real vocabulary (padding rows excluded),
        fused when the layer factory offers `linear_cross_entropy` (the [tokens, vocab] logits
        and their gradient then share one buffer). Under context parallelism `labels` are the
        full sequence's and the result is this rank's share (ContextParallel.loss_share)."""
        context = getattr(self.layers, "context", None)
        if context is not None:
            return context.loss_share(self._local_loss(x, context.local(labels)), labels)
        return self._local_loss(x, labels)

    def _local_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        fused = getattr(self.layers, "linear_cross_entropy", None)
        vocab = self.config.vocab_size
        if fused is None:
            return self.layers.cross_entropy(self.head_logits(x), labels, vocab_size=vocab)
        weight = self.embed.weight if self.head is None else self.head.weight
        return fused(self.final_norm(x), weight, labels, vocab_size=vocab, scratch=self.loss_scratch)

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, segments: torch.Tensor | None = None
    ) -> torch.Tensor:
        if tokens.shape[1] > self.config.positions:
            raise ValueError(
                f"sequence of {tokens.shape[1]} tokens is longer than the model's {self.config.positions} positions"
            )
        x = self.run_blocks(self.embed_tokens(tokens), segments)
        if labels is not None:
            return self.head_loss(x, labels)
        # Under context parallelism: the logits of this rank's tokens (its two chunks).
        return self.layers.gather_logits(self.head_logits(x))[..., : self.config.vocab_size]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
