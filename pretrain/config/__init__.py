"""Typed run configuration: dataclasses, YAML loading, dotted command-line overrides, validation.

A run config is a tree of small dataclasses, one per component. `load_config(path, overrides)`
reads YAML, applies `section.key=value` overrides, fills derived values and validates the whole
tree before anything else runs (no process group, no data, no model), so a typo in a key or a
layout that cannot work fails in a second with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

if typing.TYPE_CHECKING:
    import torch


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key."""


def _need(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


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


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (Megatron column/row split); keep it within a node."""
    pipeline: int = 1
    """Pipeline-parallel stages."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B when > 1)."""
    sequence_parallel: bool = False
    """Split activations outside tensor-parallel regions along the sequence."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (0 = plain data parallelism): 1 shards the optimizer state
    across the data-parallel ranks, 2 also the gradients, 3 also the weights. Needs the `zero`
    extra (deepspeed); the DeepSpeed config is generated from this run config."""
    offload_optimizer: bool = False
    """ZeRO: keep the optimizer state (fp32 master weights, Adam moments) in CPU memory and run
    the optimizer step there (DeepSpeed ZeRO-Offload); needs parallel.zero_stage >= 1."""
    offload_params: bool = False
    """ZeRO-3: keep the weight shards in CPU memory between uses; needs parallel.zero_stage=3."""
    zero3_persistence_threshold: int = 100000
    """ZeRO-3: parameters with fewer elements than this stay whole on every rank (norms, biases),
    which saves many tiny gathers; 0 partitions every parameter."""
    bucket_mb: float = 25.0
    """Data-parallel gradients are all-reduced in buckets of about this many MB, each started
    as soon as its gradients are ready so communication overlaps the backward pass."""
    timeout_minutes: float = 10.0
    """How long a rank waits to reach the master at start, and for any collective, before it
    fails with a message instead of hanging."""

    def validate(self) -> None:
        """Sizes, and the ZeRO combinations we support (the one that depends on the model's tied
        embeddings is a cross-section check, _check_zero_with_pipeline)."""
        for key in ("tensor", "pipeline", "virtual_stages"):
            _need(getattr(self, key) >= 1, f"parallel.{key}", f"must be >= 1, got {getattr(self, key)}")
        _need(
            self.virtual_stages == 1 or self.pipeline > 1,
            "parallel.virtual_stages",
            "interleaving needs parallel.pipeline > 1",
        )
        _need(not self.sequence_parallel or self.tensor > 1, "parallel.sequence_parallel", "needs parallel.tensor > 1")
        _need(self.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0-3, got {self.zero_stage}")
        _need(self.bucket_mb > 0, "parallel.bucket_mb", f"must be positive, got {self.bucket_mb}")
        _need(self.timeout_minutes > 0, "parallel.timeout_minutes", f"must be > 0, got {self.timeout_minutes}")
        _need(
            not self.offload_optimizer or self.zero_stage >= 1,
            "parallel.offload_optimizer",
            "needs parallel.zero_stage >= 1 (the optimizer state is offloaded by DeepSpeed's ZeRO optimizer)",
        )
        _need(
            not self.offload_params or self.zero_stage == 3,
            "parallel.offload_params",
            "needs parallel.zero_stage=3 (only ZeRO-3 partitions the weights, which is what gets offloaded)",
        )
        _need(
            self.zero3_persistence_threshold >= 0,
            "parallel.zero3_persistence_threshold",
            f"must be >= 0, got {self.zero3_persistence_threshold}",
        )
        _need(
            not (self.zero_stage == 3 and self.pipeline > 1),
            "parallel.zero_stage",
            "ZeRO-3 with parallel.pipeline > 1 is not supported: ZeRO-3 gathers each weight around its "
            "module's forward and backward through hooks on the whole model, while a pipeline stage runs "
            "slices of the model on activations received from another rank, so every weight would be "
            "gathered and released once per micro-batch with nothing in flight to hide it (DeepSpeed's own "
            "pipeline engine refuses it too). Use parallel.zero_stage=1 or 2 with pipelining",
        )


@dataclass
class DataConfig:
    path: str = ""
    """A dataset prefix (PREFIX for PREFIX.bin/.idx), or `w1 p1 w2 p2 ...` to blend."""
    tokenizer: str = ""
    """Tokenizer model file (sentencepiece .model); used to check the vocabulary and to sample."""
    split: str = "98,2,0"
    """Train/valid/test shares of the documents, comma separated."""
    objective: Literal["causal", "masked"] = "causal"
    """`causal`: next-token prediction. `masked`: BERT-style 80/10/10 masked-LM on the same files
    (needs model.bidirectional=true and a tokenizer with a mask token)."""
    mask_prob: float = 0.15
    """masked objective: share of tokens chosen for prediction."""
    mean_span: float | None = None
    """masked objective: mask whole spans of geometric length with this mean (SpanBERT)."""
    cache_dir: str = ""
    """Where sample indices are cached (default: index-cache/ beside the data)."""
    document_attention_mask: bool = False
    """Tokens attend only within their own document of a packed sequence (documents end at the
    tokenizer's end-of-document token), like Megatron's --reset-attention-mask."""

    @property
    def split_ratios(self) -> tuple[float, float, float]:
        parts = [float(x) for x in self.split.split(",")]
        return (parts + [0.0, 0.0, 0.0])[:3]  # type: ignore[return-value]

    def validate(self) -> None:
        """The keys' form only: whether the files exist is checked when a run starts
        (pretrain.data.setup.check_data), since converting a checkpoint needs no data."""
        try:
            ratios = self.split_ratios
        except ValueError:
            raise ConfigError(f"data.split: expected three comma-separated numbers, got {self.split!r}") from None
        _need(
            all(r >= 0 for r in ratios) and ratios[0] > 0,
            "data.split",
            f"needs a positive train share and no negative shares, got {self.split!r}",
        )
        if self.path:
            from pretrain.data.blend import parse_data_path  # numpy only; nothing of torch

            try:
                parse_data_path(self.path)
            except ValueError as e:
                raise ConfigError(f"data.path: {e}") from None
        _need(
            not (self.document_attention_mask and not self.tokenizer),
            "data.document_attention_mask",
            "needs data.tokenizer (its end-of-document token separates the documents)",
        )
        _need(0 < self.mask_prob < 1, "data.mask_prob", f"must be in (0, 1), got {self.mask_prob}")


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay; never applied to biases and norm weights."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""

    def validate(self) -> None:
        _need(self.lr > 0, "optimizer.lr", f"must be positive, got {self.lr}")
        _need(
            0 <= self.min_lr <= self.lr,
            "optimizer.min_lr",
            f"must be in [0, optimizer.lr={self.lr}], got {self.min_lr}",
        )
        _need(self.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _need(0 <= self.beta1 < 1, "optimizer.beta1", f"must be in [0, 1), got {self.beta1}")
        _need(0 <= self.beta2 < 1, "optimizer.beta2", f"must be in [0, 1), got {self.beta2}")
        _need(self.clip_grad >= 0, "optimizer.clip_grad", f"must be >= 0, got {self.clip_grad}")


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0
    """Linear warmup from 0 to optimizer.lr over these steps."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay from lr to min_lr after warmup."""
    decay_steps: int | None = None
    """Steps (counted from step 0) at which min_lr is reached; default train.steps."""

    def validate(self) -> None:
        _need(self.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _need(
            self.decay_steps is None or self.decay_steps > self.warmup_steps,
            "schedule.decay_steps",
            f"{self.decay_steps} must exceed schedule.warmup_steps={self.warmup_steps}",
        )


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to train for."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one data-parallel rank."""
    global_batch_size: int | None = None
    """Sequences per optimizer step across all ranks; default micro_batch_size x DP."""
    seed: int = 1234
    """Seed of weights, dropout and data order."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """`bf16` runs matmuls under bf16 autocast with fp32 master weights. `fp16` likewise in fp16,
    with dynamic loss scaling. With ZeRO both map to DeepSpeed's bf16/fp16 modes: 16-bit weights
    and gradients, fp32 master weights in the (sharded) optimizer state."""
    log_interval: int = 10
    """Log metrics every this many steps."""
    eval_interval: int = 100
    """Evaluate validation loss every this many steps (0 disables; also runs at the end)."""
    eval_iters: int = 10
    """Micro-batches per evaluation."""
    exit_after_minutes: float | None = None
    """Save a checkpoint and stop cleanly after this many minutes of training."""
    hang_timeout_minutes: float = 30.0
    """A rank whose training makes no progress (no step operation, evaluation or checkpoint save
    starts) for this many minutes writes its threads' stacks to {logging.dir}/hangs/rank{R}.txt
    and exits with code 76; 0 disables the watchdog. Keep it above parallel.timeout_minutes so
    a timed-out collective reports its own error first."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; `auto` picks CUDA when present."""

    def validate(self) -> None:
        """Whether the global batch splits over the data-parallel ranks is validate_layout's job."""
        # 0 steps would build the data and model only to train nothing (it ended in a traceback).
        _need(
            self.steps >= 1,
            "train.steps",
            f"must be >= 1 (the number of optimizer steps to train for), got {self.steps}",
        )
        _need(self.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        gbs = self.global_batch_size
        _need(
            gbs is None or (gbs >= 1 and gbs % self.micro_batch_size == 0),
            "train.global_batch_size",
            f"{gbs} is not a positive multiple of train.micro_batch_size={self.micro_batch_size}",
        )
        _need(self.log_interval >= 1, "train.log_interval", f"must be >= 1, got {self.log_interval}")
        _need(self.eval_interval >= 0, "train.eval_interval", f"must be >= 0, got {self.eval_interval}")
        _need(self.eval_iters >= 1, "train.eval_iters", f"must be >= 1, got {self.eval_iters}")
        _need(
            self.exit_after_minutes is None or self.exit_after_minutes > 0,
            "train.exit_after_minutes",
            f"must be positive, got {self.exit_after_minutes}",
        )
        _need(
            self.hang_timeout_minutes >= 0,
            "train.hang_timeout_minutes",
            f"must be >= 0 (0 disables the watchdog), got {self.hang_timeout_minutes}",
        )


@dataclass
class CheckpointConfig:
    dir: str = ""
    """Directory holding step_N/ checkpoints and the `latest` pointer (empty: no checkpoints)."""
    interval: int = 0
    """Save every this many steps (0: only at the end)."""
    resume: str = "auto"
    """`auto` resumes from `latest` when there is one, `none` never, or a step_N directory path."""
    keep_last: int = 0
    """Keep only the newest K checkpoints (0 keeps all); older ones go once a newer is complete."""
    async_save: bool = True
    """Write checkpoints in the background: training waits only while the tensors are copied to
    host memory (and, at the next save, for the previous write to finish)."""

    def validate(self) -> None:
        _need(self.interval >= 0, "checkpoint.interval", f"must be >= 0, got {self.interval}")
        _need(self.keep_last >= 0, "checkpoint.keep_last", f"must be >= 0, got {self.keep_last}")


@dataclass
class LoggingConfig:
    dir: str = ""
    """Directory for metrics.jsonl and TensorBoard events (empty: console only)."""
    tensorboard: bool = True
    """Write TensorBoard event files under logging.dir."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device for MFU; default measured at start with a matmul."""

    def validate(self) -> None:
        _need(
            self.peak_tflops is None or self.peak_tflops > 0,
            "logging.peak_tflops",
            f"must be positive, got {self.peak_tflops}",
        )


@dataclass
class FaultsConfig:
    """What the run does about bad steps and slow ranks (pretrain/faults/). A bad step (loss or
    gradient norm not finite, or a loss spike) is skipped on every rank; max_bad_steps of them in
    a row roll the run back to its last checkpoint, past the data that led there."""

    spike_sigmas: float = 6.0
    """A loss above mean + spike_sigmas x std of the last spike_window good steps is a spike;
    0 turns spike detection off (non-finite values are always caught)."""
    spike_window: int = 100
    """Good steps the spike rule looks back on; it starts judging once the window is full."""
    spike_min_increase: float = 0.1
    """A spike must also exceed the window's mean loss by this fraction of it: late in training
    the loss barely moves, and a tiny std would otherwise flag ordinary noise."""
    max_bad_steps: int = 5
    """Consecutive skipped steps after which the run rolls back to its last checkpoint."""
    max_rollbacks: int = 3
    """Rollbacks allowed in one run (counted across restarts); one more stops it with exit 77."""
    straggler_factor: float = 1.5
    """Every log interval, a rank whose own work (step time minus time blocked waiting for its
    peers) exceeds the median's by this factor is reported; 0 turns the check off."""

    def validate(self) -> None:
        for key in ("spike_sigmas", "spike_min_increase", "straggler_factor"):
            if getattr(self, key) < 0:
                raise ConfigError(f"faults.{key}: must be >= 0 (0 turns it off), got {getattr(self, key)}")
        for key in ("spike_window", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"faults.{key}: must be at least 1, got {getattr(self, key)}")
        if self.max_rollbacks < 0:
            raise ConfigError(f"faults.max_rollbacks: must be >= 0, got {self.max_rollbacks}")
        if 0 < self.straggler_factor <= 1:
            raise ConfigError(
                f"faults.straggler_factor: must be above 1 (a factor over the median) or 0 "
                f"(off), got {self.straggler_factor}"
            )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    # Derived values, computed here only: read these, not train.global_batch_size/precision.
    def global_batch(self, dp: int) -> int:
        """Sequences per optimizer step over `dp` data-parallel ranks (default one micro-batch each)."""
        return self.train.global_batch_size or self.train.micro_batch_size * dp

    def accumulation_steps(self, dp: int) -> int:
        """Micro-batches each data-parallel rank runs per optimizer step (out of `dp` ranks)."""
        t = self.train
        per_step = t.micro_batch_size * dp
        global_batch = self.global_batch(dp)
        if global_batch % per_step:
            raise ConfigError(
                f"train.global_batch_size: {global_batch} is not divisible by "
                f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}"
            )
        return global_batch // per_step

    @property
    def compute_dtype(self) -> torch.dtype:
        """The torch dtype train.precision computes in: float32, bfloat16 or float16."""
        import torch  # lazy: loading and validating a config needs no torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.train.precision]


def pad_vocab(vocab_size: int, multiple: int) -> int:
    return multiple * math.ceil(vocab_size / multiple)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the key.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML or override value to the annotated type; raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported config type {tp} at {key}")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(
            f"{key}: unknown key; valid keys under '{prefix.rstrip('.') or 'config'}' are {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.steps=40")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    # YAML parsing gives `40` -> int, `true` -> bool, `null` -> None, `1e-4` -> str in YAML 1.1,
    # so numbers in exponent form are retried as float.
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str):
        try:
            parsed = float(parsed) if any(c in parsed for c in "eE.") else parsed
        except ValueError:
            pass
    if not isinstance(parsed, (bool, int, float, str, type(None))):
        parsed = value  # lists, mappings, dates: keep the text, the field type decides
    return key.split("."), parsed


def _is_string_field(path: list[str]) -> bool:
    """Whether `path` names a str-typed config field (its override text is then taken verbatim)."""
    cls: Any = RunConfig
    for part in path:
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return cls is str


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides to a nested dict (before typing, so types are checked once)."""
    for text in overrides:
        path, value = _parse_override(text)
        if _is_string_field(path):
            value = text.split("=", 1)[1]  # `data.tokenizer=1e5` stays the path "1e5"
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict, overrides: list[str] = ()) -> RunConfig:
    raw = apply_overrides(_deep_copy(raw), list(overrides))
    config = _build(RunConfig, raw, "")
    finalize(config)
    return config


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `key.sub=value` overrides, fill derived values, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    # A list or a scalar at the top level would reach the overrides as a non-dict and fail there
    # with a TypeError; say what the file must look like instead.
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (model:, train:, ...) at the top level, "
            f"got a {type(raw).__name__}; see configs/ for examples"
        )
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    return raw


# ---------------------------------------------------------------------------------------------
# Validation of the whole tree: each section's own rules (its validate()), the derived fields,
# then the few rules that span sections. The world size is checked by validate_layout once it
# is known.


def finalize(config: RunConfig) -> None:
    """Validate each section, fill derived fields, check across sections; raises ConfigError
    naming the first bad key.

    Sections first: the derived fields are computed from their values (the vocabulary padding
    divides by model.make_vocab_size_divisible_by x parallel.tensor)."""
    for section in dataclasses.fields(config):
        getattr(config, section.name).validate()
    derive(config)
    for check in CROSS_SECTION_CHECKS:
        check(config)


def derive(config: RunConfig) -> None:
    """Fill the fields left unset whose value follows from others (they are saved with every
    checkpoint, so a later run with another layout keeps them)."""
    m = config.model
    if m.padded_vocab_size is None:
        m.padded_vocab_size = pad_vocab(m.vocab_size, m.make_vocab_size_divisible_by * config.parallel.tensor)


def _check_tensor_split(config: RunConfig) -> None:
    """Every tensor-parallel rank gets an equal share of heads, MLP, vocabulary (and sequence)."""
    m, tp = config.model, config.parallel.tensor
    _need(
        m.num_heads % tp == 0,
        "parallel.tensor",
        f"model.num_heads={m.num_heads} is not divisible by parallel.tensor={tp}",
    )
    _need(
        m.kv_heads % tp == 0,
        "parallel.tensor",
        f"model.num_kv_heads={m.kv_heads} is not divisible by parallel.tensor={tp}",
    )
    _need(
        m.ffn_size % tp == 0,
        "parallel.tensor",
        f"model.ffn_hidden_size={m.ffn_size} is not divisible by parallel.tensor={tp}",
    )
    _need(
        not config.parallel.sequence_parallel or m.seq_length % tp == 0,
        "parallel.sequence_parallel",
        f"model.seq_length={m.seq_length} is not divisible by parallel.tensor={tp}",
    )
    _need(
        m.padded_vocab_size % tp == 0,
        "model.padded_vocab_size",
        f"{m.padded_vocab_size} is not divisible by parallel.tensor={tp}",
    )


def _check_pipeline_split(config: RunConfig) -> None:
    """Every (virtual) pipeline stage gets the same number of layers."""
    m, p = config.model, config.parallel
    stages = p.pipeline * p.virtual_stages
    _need(
        m.num_layers % stages == 0,
        "model.num_layers",
        f"{m.num_layers} layers cannot be split into parallel.pipeline={p.pipeline} x "
        f"parallel.virtual_stages={p.virtual_stages} = {stages} equal stages",
    )


def _check_zero_with_pipeline(config: RunConfig) -> None:
    """ZeRO-2 under pipelining needs untied embeddings (the rest of ZeRO's rules are
    ParallelConfig.validate's)."""
    p = config.parallel
    _need(
        not (p.zero_stage == 2 and p.pipeline > 1 and config.model.tied),
        "parallel.zero_stage",
        "ZeRO-2 with parallel.pipeline > 1 needs untied embeddings: ZeRO-2 reduces and shards each "
        "gradient during every micro-batch's backward, but the two copies of a tied embedding (first "
        "and last stage) must first be summed, and the first stage only has its gradient at the very "
        "end of the pipeline's backward. Set model.tie_embeddings=false, or use parallel.zero_stage=1",
    )


def _check_objective(config: RunConfig) -> None:
    """The training objective and the attention direction go together."""
    _need(
        (config.data.objective == "masked") == config.model.bidirectional,
        "model.bidirectional",
        "must be true exactly when data.objective=masked (a causal model cannot learn masked-LM, "
        "and a bidirectional one sees the next token)",
    )


def _check_attention_precision(config: RunConfig) -> None:
    """flash-attn has no fp32 kernels (whether it is installed is checked when a run starts)."""
    _need(
        not (config.model.attention_backend == "flash_attn" and config.train.precision == "fp32"),
        "model.attention_backend",
        "flash_attn runs in bf16 or fp16 only: set train.precision=bf16, or use sdpa",
    )


CROSS_SECTION_CHECKS = (
    _check_tensor_split,
    _check_pipeline_split,
    _check_zero_with_pipeline,
    _check_objective,
    _check_attention_precision,
)


def validate_layout(config: RunConfig, world_size: int) -> int:
    """Check that the config's layout fits `world_size` ranks; returns the data-parallel size.

    Called before any process group exists (pretrain.parallel.topology.init_distributed), so a
    bad layout fails in a second with the numbers."""
    p = config.parallel
    model_parallel = p.tensor * p.pipeline
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel: world size {world_size} is not divisible by parallel.tensor x "
            f"parallel.pipeline = {p.tensor} x {p.pipeline} = {model_parallel}"
        )
    dp = world_size // model_parallel
    try:
        micro_batches = config.accumulation_steps(dp)
    except ConfigError as e:
        raise ConfigError(f"{e} (world {world_size} / (tensor {p.tensor} x pipeline {p.pipeline}))") from None
    if p.virtual_stages > 1 and micro_batches % p.pipeline:
        raise ConfigError(
            f"parallel.virtual_stages: the interleaved schedule needs the number of "
            f"micro-batches per step ({micro_batches}) to be a multiple of "
            f"parallel.pipeline={p.pipeline}; raise train.global_batch_size"
        )
    return dp
