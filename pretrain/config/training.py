"""The `train:` section: steps, batch sizes, precision, evaluation and time limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pretrain.config.errors import _need


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
