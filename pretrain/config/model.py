"""The `model:` section: the network's shape, and the values that follow from it (kv_heads,
head_dim, ffn_size, vocab_rows, ...). How it splits over parallel.* is checks.py's job."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pretrain.config.errors import _need
from pretrain.config.moe import MoEConfig


@dataclass
class RopeScaling:
    """Llama 3.1's RoPE frequency scaling (transformers' rope_type "llama3"): rotations slower
    than the original context (wavelength > original_max_position_embeddings / low_freq_factor)
    are slowed down `factor` times, those faster than original / high_freq_factor are kept, and
    those between are blended smoothly. The defaults are Llama 3.1's published values."""

    rope_type: Literal["llama3"] = "llama3"
    """The scaling rule; only Llama 3's is implemented."""
    factor: float = 8.0
    """How many times the context is stretched (slowest rotations divided by it)."""
    low_freq_factor: float = 1.0
    """Wavelengths above original_max_position_embeddings / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """Wavelengths below original_max_position_embeddings / high_freq_factor are not scaled."""
    original_max_position_embeddings: int = 8192
    """The context the model was pretrained at before the extension."""

    def validate(self) -> None:
        key = "model.rope_scaling"
        _need(self.factor >= 1.0, f"{key}.factor", f"must be >= 1 (1 = no scaling), got {self.factor}")
        _need(self.low_freq_factor > 0, f"{key}.low_freq_factor", f"must be positive, got {self.low_freq_factor}")
        _need(
            self.high_freq_factor > self.low_freq_factor,
            f"{key}.high_freq_factor",
            f"must be greater than {key}.low_freq_factor={self.low_freq_factor} (the band between them is "
            f"blended), got {self.high_freq_factor}",
        )
        _need(
            self.original_max_position_embeddings > 0,
            f"{key}.original_max_position_embeddings",
            f"must be positive, got {self.original_max_position_embeddings}",
        )


@dataclass
class ModelConfig:
    flavour: Literal["gpt2", "llama"] = "gpt2"
    """`gpt2`: learned positions, LayerNorm, GeLU MLP, tied embeddings, biases.
    `llama`: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied output, no biases."""
    num_layers: int = 2
    """Number of transformer blocks."""
    hidden_size: int = 128
    """Width of the residual stream."""
    num_heads: int = 4
    """Attention (query) heads; hidden_size must be divisible by it."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; default num_heads (plain multi-head)."""
    ffn_hidden_size: int | None = None
    """MLP width; default 4*hidden (gpt2) or 8/3*hidden rounded up to a multiple of 64 (llama)."""
    vocab_size: int = 8000
    """Tokenizer vocabulary size (real ids); the embedding is padded, see padded_vocab_size."""
    make_vocab_size_divisible_by: int = 128
    """The embedding rows are padded to a multiple of this times parallel.tensor (Megatron)."""
    padded_vocab_size: int | None = None
    """Rows of the embedding; filled at load from vocab_size. Set it to pin a checkpoint's size."""
    seq_length: int = 256
    """Training sequence length in tokens."""
    max_position_embeddings: int | None = None
    """Size of the position table (gpt2) / RoPE cache (llama); default seq_length."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base (llama flavour)."""
    rope_scaling: RopeScaling | None = None
    """Llama-3-style RoPE frequency scaling for long context (llama flavour); null: none."""
    qkv_bias: bool = False
    """Biases on the query/key/value projection (Qwen2); llama flavour (gpt2 has all biases)."""
    tie_embeddings: bool | None = None
    """Share input embedding and output projection; default True for gpt2, False for llama."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * num_layers)."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """`full` recomputes each block in backward; `selective` only the attention core."""
    bidirectional: bool = False
    """Attend in both directions (no causal mask), for data.objective=masked."""
    attention_backend: Literal["sdpa", "flash_attn"] = "sdpa"
    """`sdpa`: torch's scaled_dot_product_attention (FlashAttention/cuDNN kernels on GPU, a fused
    kernel on CPU). `flash_attn`: the flash-attn package (GPU, bf16/fp16), when installed."""
    compile: bool = False
    """torch.compile each transformer block (fuses norms, activations, RoPE and residual adds;
    inductor generates C++ on CPU, Triton on GPU). The first steps pay the compile time."""
    moe: MoEConfig | None = None
    """Mixture of experts in place of the MLP of every (or every N-th) block (pretrain/config/
    moe.py: model.moe.num_experts=8 or a YAML mapping); null: dense MLPs everywhere."""

    # Derived values: read these, not the optional fields above.
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.flavour == "llama":
            return 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        return 4 * self.hidden_size

    @property
    def tied(self) -> bool:
        return self.flavour == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    @property
    def positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def vocab_rows(self) -> int:
        """Padded vocabulary actually allocated (single-device default when not filled at load)."""
        return self.padded_vocab_size or pad_vocab(self.vocab_size, self.make_vocab_size_divisible_by)

    def validate(self) -> None:
        """The model's own rules; how it splits over parallel.* is checked by finalize."""
        for key in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "vocab_size",
            "seq_length",
            "make_vocab_size_divisible_by",
        ):
            _need(getattr(self, key) > 0, f"model.{key}", f"must be positive, got {getattr(self, key)}")
        _need(
            self.hidden_size % self.num_heads == 0,
            "model.hidden_size",
            f"{self.hidden_size} is not divisible by model.num_heads={self.num_heads}",
        )
        _need(
            self.kv_heads > 0 and self.num_heads % self.kv_heads == 0,
            "model.num_kv_heads",
            f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.kv_heads}",
        )
        _need(
            self.flavour == "llama" or self.kv_heads == self.num_heads,
            "model.num_kv_heads",
            "grouped-query attention needs model.flavour=llama",
        )
        _need(
            self.flavour == "gpt2" or self.head_dim % 2 == 0,
            "model.hidden_size",
            f"RoPE needs an even head dimension, got {self.head_dim}",
        )
        self._validate_llama_options()
        if self.moe is not None:
            self.moe.validate(self)
        _need(self.ffn_size > 0, "model.ffn_hidden_size", f"must be positive, got {self.ffn_hidden_size}")
        _need(
            self.positions >= self.seq_length,
            "model.seq_length",
            f"{self.seq_length} is longer than model.max_position_embeddings={self.positions}",
        )
        _need(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _need(self.norm_eps > 0, "model.norm_eps", f"must be positive, got {self.norm_eps}")
        # Unset, it is filled (always large enough) once parallel.tensor is known.
        _need(
            self.padded_vocab_size is None or self.padded_vocab_size >= self.vocab_size,
            "model.padded_vocab_size",
            f"{self.padded_vocab_size} is smaller than model.vocab_size={self.vocab_size}",
        )

    def _validate_llama_options(self) -> None:
        """The options only the llama flavour's RoPE attention has."""
        _need(
            self.rope_scaling is None or self.flavour == "llama",
            "model.rope_scaling",
            "scales RoPE, which only model.flavour=llama uses (gpt2 learns its positions); set it to null",
        )
        _need(
            not self.qkv_bias or self.flavour == "llama",
            "model.qkv_bias",
            "is a llama-flavour option (gpt2 has biases on every projection already); set it to false",
        )
        if self.rope_scaling is not None:
            self.rope_scaling.validate()


def pad_vocab(vocab_size: int, multiple: int) -> int:
    return multiple * math.ceil(vocab_size / multiple)
