"""The `optimizer:` and `schedule:` sections: AdamW and the learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pretrain.config.errors import _need


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
