"""Training strategies: how a rank's gradients become an update, and what its checkpoint holds.

The trainer and the checkpoint code talk to one small protocol, `TrainingStrategy`, and never
ask which implementation they hold (torchtitan parallelizes the model from outside the loop,
OLMo-core's TrainModule owns the optimizer step; this is the same idea):

DataParallel   our AdamW, our bucketed DP gradient reduction (pretrain/parallel/data.py), our
               clipping and, in fp16, our dynamic loss scaler; checkpoints replicated.
ZeroEngine     DeepSpeed's ZeRO optimizer driven under our pipeline executor
               (pretrain/parallel/zero.py); checkpoints partitioned.

`strategy_class` is the one place that chooses (parallel.zero_stage). Context and expert
parallelism plug in the same way: a strategy that wraps the chunks the schedule runs, reduces
their gradients over its groups and steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from pretrain.checkpoint.state import ReplicatedState
from pretrain.config import RunConfig
from pretrain.moe_training import with_experts
from pretrain.optim import BackwardRootChunk, DynamicLossScaler, build_optimizer, set_learning_rate, unscale_and_check
from pretrain.parallel.data import GradientSync, clip_gradients, global_grad_norm
from pretrain.parallel.topology import Topology
from pretrain.parallel.zero import ZeroEngine

NormProblem = Callable[[float], "str | None"]


class TrainingStrategy(Protocol):
    @staticmethod
    def check_environment(config: RunConfig) -> None:
        """Raise ConfigError when this machine cannot run the strategy as configured (a missing
        library, a precision the device lacks): checked before any process group starts."""

    @staticmethod
    def weight_dtype(config: RunConfig) -> torch.dtype:
        """The dtype the model's weights are built and kept in during training."""

    chunks: list
    """What the pipeline schedule runs: the model chunks, wrapped where the strategy must see
    every backward pass begin (loss scaling, ZeRO's backward prologue)."""

    def on_last_backward(self, chunk: int) -> None:
        """Called by the schedule right before a chunk's last backward of the step."""

    def step(self, lr: float, *, problem: str | None, norm_problem: NormProblem) -> dict:
        """Finish the step's gradients and update, unless `problem` (the loss condemned the step)
        or `norm_problem(grad_norm)` says why not; returns grad_norm, problem (None: updated),
        and in fp16 loss_scale and skipped (an overflow the loss scaler handles)."""

    def weights_finite(self) -> bool:
        """Whether this rank's weights are all finite (no communication)."""

    def checkpoint_state(self):
        """What a checkpoint of this rank holds (pretrain/checkpoint/state.py)."""

    def state_dict(self) -> dict:
        """Plain numbers carried across a resume in meta.json (the fp16 loss scaler)."""

    def load_state_dict(self, state: dict) -> None: ...

    def describe(self) -> str | None:
        """A line for the start of the run's log, or None."""

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """What this rank holds now, by category: "weights", "gradients" (with the buffers they
        live in) and "optimizer" state; for measuring memory (pretrain/planner/live_memory.py)."""


def strategy_class(config: RunConfig) -> type[TrainingStrategy]:
    """The strategy parallel.zero_stage asks for."""
    return ZeroEngine if config.parallel.zero_stage else DataParallel


def build_strategy(config: RunConfig, topo: Topology, chunks: list[nn.Module], *, accumulation: int):
    """The strategy parallel.zero_stage asks for; with model.moe, wrapped in what a step does for
    the experts (pretrain/moe_training.py: aux-loss scaling, load metrics, router bias updates)."""
    strategy = strategy_class(config)(config, topo, chunks, accumulation=accumulation)
    return with_experts(strategy, config, topo, accumulation=accumulation)


def weight_dtype(config: RunConfig) -> torch.dtype:
    """The dtype to build the model in for this run's strategy."""
    return strategy_class(config).weight_dtype(config)


class DataParallel:
    """Every DP replica holds the whole model (its TP/PP shard) and the optimizer state of it."""

    def __init__(self, config: RunConfig, topo: Topology, chunks: list[nn.Module], *, accumulation: int = 1) -> None:
        # `accumulation` is ZeRO's business (DeepSpeed's config); the schedule runs the micro-batches.
        self.config, self.topo, self.model_chunks = config, topo, chunks
        self.params = [p for chunk in chunks for p in chunk.parameters()]
        self.optimizer = build_optimizer(self.params, config.optimizer)
        self.grad_sync = GradientSync(chunks, topo, bucket_mb=config.parallel.bucket_mb)
        self.scaler = DynamicLossScaler() if config.train.precision == "fp16" else None
        self.chunks = chunks
        if self.scaler is not None:
            self.chunks = [BackwardRootChunk(c, scale=lambda: self.scaler.scale) for c in chunks]

    @staticmethod
    def check_environment(config: RunConfig) -> None:
        pass  # torch alone

    @staticmethod
    def weight_dtype(config: RunConfig) -> torch.dtype:
        # Our AdamW updates the weights themselves, so they stay fp32; autocast runs the matmuls
        # in 16 bits.
        return torch.float32

    def on_last_backward(self, chunk: int) -> None:
        self.grad_sync.enable(chunk)

    def step(self, lr: float, *, problem: str | None, norm_problem: NormProblem) -> dict:
        set_learning_rate(self.optimizer, lr)
        self.grad_sync.finish()
        overflow = False
        if self.scaler is not None:  # every rank agrees on skipping (unscale_and_check reduces)
            overflow = unscale_and_check(self.params, scale=self.scaler.scale)
            self.scaler.update(overflow)  # raises Diverged at the minimum scale
        grad_norm = math.inf
        if not overflow:
            grad_norm = global_grad_norm(self.params, topo=self.topo)
            problem = problem or norm_problem(grad_norm)
            if problem is None:
                clip_gradients(self.params, norm=grad_norm, max_norm=self.config.optimizer.clip_grad)
                self.optimizer.step()
        self.grad_sync.zero_grad()  # in place: the gradients are views into its buckets
        record = {"grad_norm": grad_norm, "problem": problem}
        if self.scaler is not None:
            record.update(loss_scale=float(self.scaler.scale), skipped=overflow)
        return record

    def weights_finite(self) -> bool:
        return all(bool(p.isfinite().all()) for p in self.params)

    def checkpoint_state(self) -> ReplicatedState:
        return ReplicatedState(self.model_chunks, self.optimizer)

    def state_dict(self) -> dict:
        return {"loss_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])

    def describe(self) -> str | None:
        return None

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return {
            "weights": self.params,
            "gradients": [p.grad for p in self.params] + [b.buffer for b in self.grad_sync.buckets],
            "optimizer": state,
        }
