"""Optimizer (AdamW with decay only on matrices) and the learning-rate schedule.

Gradient clipping needs the norm over the whole parallel grid: pretrain/parallel/data.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from pretrain.config import OptimizerConfig, ScheduleConfig
from pretrain.faults.divergence import Diverged
from pretrain.parallel.waits import waiting


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
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, foreach=True)


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


# ---------------------------------------------------------------------------------------------
# fp16: dynamic loss scaling. The constants are DeepSpeed's defaults and are also written into
# the DeepSpeed config of ZeRO runs (pretrain/parallel/zero_config.py), so fp16 behaves the same with
# and without ZeRO.

LOSS_SCALE_INIT_POWER = 16
"""Initial loss scale 2**16."""
LOSS_SCALE_WINDOW = 1000
"""Double the scale after this many steps without overflow."""
LOSS_SCALE_HYSTERESIS = 2
"""Overflows tolerated (steps skipped at the same scale) before the scale is halved."""
LOSS_SCALE_MIN = 1.0
"""The scale never goes below this."""


class DynamicLossScaler:
    """The fp16 loss scale without ZeRO, with DeepSpeed's update rule: on overflow the step is
    skipped and, once `hysteresis` overflows have been seen, the scale halves (an overflow at the
    minimum scale stops the run); after `window` steps since the last overflow it doubles.
    Its state goes into checkpoints (`state_dict`)."""

    def __init__(self) -> None:
        self.scale = float(2**LOSS_SCALE_INIT_POWER)
        self.iteration = 0
        self.last_overflow = -1
        self.hysteresis = LOSS_SCALE_HYSTERESIS

    def update(self, overflow: bool) -> None:
        if overflow:
            if self.hysteresis <= 1:
                if self.scale == LOSS_SCALE_MIN:  # as DeepSpeed: fp16 cannot represent this run
                    raise Diverged(
                        f"fp16 loss scale is already at its minimum ({LOSS_SCALE_MIN}) and the "
                        "gradients still overflow; train with train.precision=bf16"
                    )
                self.scale = max(self.scale / 2, LOSS_SCALE_MIN)
            else:
                self.hysteresis -= 1
            self.last_overflow = self.iteration
        else:
            stable = self.iteration - self.last_overflow - 1
            if stable > 0 and stable % LOSS_SCALE_WINDOW == 0:
                self.hysteresis = LOSS_SCALE_HYSTERESIS
                self.scale *= 2
        self.iteration += 1

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "iteration": self.iteration,
            "last_overflow": self.last_overflow,
            "hysteresis": self.hysteresis,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.iteration = float(state["scale"]), int(state["iteration"])
        self.last_overflow, self.hysteresis = int(state["last_overflow"]), int(state["hysteresis"])


def unscale_and_check(params: list[nn.Parameter], *, scale: float, group=None) -> bool:
    """Divide gradients by the loss scale; True when any rank found inf/NaN (all ranks agree, so
    they all skip the step together). `group=None` is the whole world when distributed."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    found = torch.zeros((), device=grads[0].device if grads else "cpu")
    if grads:
        torch._foreach_mul_(grads, 1.0 / scale)
        found = torch.stack([g.isfinite().all().logical_not() for g in grads]).any().float()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        with waiting():
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
    return bool(found.item())


class _BackwardRoot(torch.autograd.Function):
    """Identity forward. Its backward is the first node of the backward pass that starts at its
    output: it calls `on_start` and multiplies the incoming gradient by the loss scale."""

    @staticmethod
    def forward(ctx, x, scale, on_start):
        ctx.scale, ctx.on_start = scale, on_start
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.on_start is not None:
            ctx.on_start()
        scale = ctx.scale()
        return (grad * scale if scale != 1.0 else grad), None, None


class BackwardRootChunk:
    """A model chunk as the pipeline executor sees it, whose every backward pass starts in a
    `_BackwardRoot`: the loss (whole model, or a last stage's head) gets scaled, and `on_start`
    runs before any gradient of the pass exists (ZeRO's backward prologue).

    The executor calls backward on what `__call__` or `head_loss` return (a loss) and, on a
    pipeline stage that is not the last, on what `run_blocks` returns (with the next stage's
    gradient, already scaled there). Everything else is the wrapped chunk's own attribute."""

    def __init__(self, chunk: nn.Module, *, scale=lambda: 1.0, on_start=None) -> None:
        self.chunk, self.scale, self.on_start = chunk, scale, on_start

    def __getattr__(self, name: str):
        return getattr(self.chunk, name)

    def _root(self, x: torch.Tensor, *, loss: bool) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return x
        return _BackwardRoot.apply(x, self.scale if loss else (lambda: 1.0), self.on_start)

    def __call__(self, tokens: torch.Tensor, labels=None, segments=None) -> torch.Tensor:
        out = self.chunk(tokens, labels=labels, segments=segments)
        return self._root(out, loss=True) if labels is not None else out

    def head_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._root(self.chunk.head_loss(x, labels), loss=True)

    def run_blocks(self, x: torch.Tensor, segments=None) -> torch.Tensor:
        out = self.chunk.run_blocks(x, segments)
        return out if self.chunk.stage.last else self._root(out, loss=False)

    def weight_root(self, x: torch.Tensor) -> torch.Tensor:
        """The root of a zero-bubble W pass (pretrain/models/weight_grads.py accumulate): a
        backward pass of its own, so `on_start` runs for it too; its gradients come from B's
        that were scaled already."""
        return self._root(x, loss=False)
