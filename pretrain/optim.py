"""Optimizer (AdamW with decay only on matrices) and the learning-rate schedule.

Gradient clipping needs the norm over the whole parallel grid: pretrain/parallel/data.py.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from pretrain.config import OptimizerConfig, ScheduleConfig


def build_optimizer(params: Iterable[nn.Parameter], config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices and embeddings, none on biases and norms."""
    decay, no_decay = [], []
    for param in params:
        if not param.requires_grad:
            continue
        # Biases and norm gains are the 1-D parameters; decaying them hurts and Megatron skips them.
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             eps=config.eps, foreach=True)


def learning_rate(step: int, *, optim: OptimizerConfig, schedule: ScheduleConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup, then decay to min_lr."""
    warmup = schedule.warmup_steps
    if warmup and step <= warmup:
        return optim.lr * step / warmup
    if schedule.decay == "constant":
        return optim.lr
    decay_steps = schedule.decay_steps or total_steps
    if decay_steps <= warmup:
        return optim.min_lr
    progress = min(max((step - warmup) / (decay_steps - warmup), 0.0), 1.0)
    if schedule.decay == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        factor = 1.0 - progress
    return optim.min_lr + (optim.lr - optim.min_lr) * factor


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
