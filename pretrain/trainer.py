"""The trainer: what one optimizer step needs, built once (`Trainer.step`, `Trainer.evaluate`).

pretrain/train.py builds it and runs the loop around it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from pretrain.config import ConfigError, RunConfig
from pretrain.data.loader import SampleDataset, SampleLoader
from pretrain.faults.divergence import DivergenceGuard
from pretrain.optim import (
    BackwardRootChunk,
    DynamicLossScaler,
    build_optimizer,
    learning_rate,
    set_learning_rate,
    unscale_and_check,
)
from pretrain.parallel.data import GradientSync, clip_gradients, global_grad_norm, reduce_loss, shared_loss
from pretrain.parallel.pipeline import forward_backward
from pretrain.parallel.topology import Topology
from pretrain.parallel.waits import waiting


def accumulation_steps(config: RunConfig, *, data_parallel: int) -> int:
    t = config.train
    per_step = t.micro_batch_size * data_parallel
    global_batch = t.global_batch_size or per_step
    if global_batch % per_step:
        raise ConfigError(
            f"train.global_batch_size: {global_batch} is not divisible by "
            f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x "
            f"{data_parallel}"
        )
    return global_batch // per_step


class Trainer:
    """What one step needs, built once; `step()` and `evaluate()` are the loop's two verbs.

    Without ZeRO: our AdamW, our bucketed DP reduction, our clipping (and, in fp16, our dynamic
    loss scaler). With parallel.zero_stage > 0 a ZeroEngine owns all four (DeepSpeed's ZeRO
    optimizer); the schedule, data and loss are the same code either way."""

    def __init__(
        self,
        config: RunConfig,
        topo: Topology,
        chunks: list,
        *,
        train_batches: Iterator[dict],
        valid: SampleDataset | None = None,
        collate: Callable | None = None,
    ) -> None:
        self.config, self.topo, self.chunks, self.valid, self.collate = config, topo, chunks, valid, collate
        self.batches = train_batches
        # Told each operation as it starts (the hang watchdog's beat); run() sets it.
        self.progress: Callable[[str], None] = lambda operation: None
        self.params = [p for chunk in chunks for p in chunk.parameters()]
        self.num_params = sum(p.numel() for p in self.params)  # before ZeRO-3 partitions them
        self.accum = accumulation_steps(config, data_parallel=topo.dp)
        self.zero, self.grad_sync, self.scaler = None, None, None
        precision = config.train.precision
        if config.parallel.zero_stage:
            from pretrain.parallel.zero import ZeroEngine  # imports deepspeed

            self.zero = ZeroEngine(config, topo, chunks, accumulation=self.accum)
            self.optimizer = self.zero.optimizer
            self.schedule_chunks = self.zero.chunks
        else:
            self.optimizer = build_optimizer(self.params, config.optimizer)
            self.grad_sync = GradientSync(chunks, topo, bucket_mb=config.parallel.bucket_mb)
            self.schedule_chunks = chunks
            if precision == "fp16":
                self.scaler = DynamicLossScaler()
                self.schedule_chunks = [BackwardRootChunk(c, scale=lambda: self.scaler.scale) for c in chunks]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        device_type = topo.device.type
        self.autocast = lambda: torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
        seq = config.model.seq_length // (topo.tp if topo.sequence_parallel else 1)
        self.hidden_shape = (config.train.micro_batch_size, seq, config.model.hidden_size)
        self.hidden_dtype = dtype or torch.float32  # what activations travel in between stages
        self.guard = DivergenceGuard(config.faults)

    def step(self, step: int) -> dict:
        """One optimizer step, or a skipped one: `bad_step` says why (every rank judges the same
        loss and gradient norm, so all skip together)."""
        c = self.config
        lr = learning_rate(step, optim=c.optimizer, schedule=c.schedule, total_steps=c.train.steps)
        losses = forward_backward(
            chunks=self.schedule_chunks,
            topo=self.topo,
            batches=self.batches,
            progress=self.progress,
            micro_batches=self.accum,
            autocast=self.autocast,
            hidden_shape=self.hidden_shape,
            hidden_dtype=self.hidden_dtype,
            on_last_backward=self.zero.on_last_backward if self.zero else self.grad_sync.enable,
        )
        self.progress("optimizer")
        loss = shared_loss(losses, self.topo)
        problem = self.guard.loss_problem(loss)
        if self.zero:
            record = self.zero.step(lr, skip=problem is not None)
            if problem is None and record["skipped"] and c.train.precision != "fp16":
                problem = self.guard.norm_problem(record["grad_norm"])  # DeepSpeed found non-finite gradients
        else:
            record = self._step(lr, problem)
            problem = record.pop("problem")
        self.guard.record(loss, problem)
        if c.train.precision == "fp16":
            record["loss_scale"] = float(self.zero.optimizer.loss_scale if self.zero else self.scaler.scale)
        else:
            record.pop("skipped")
        return {"loss": loss, "lr": lr, **record, "bad_step": problem, "skipped_steps": self.guard.skipped_total}

    def _step(self, lr: float, problem: str | None) -> dict:
        """Our own optimizer step; `problem`: the loss already condemned the step."""
        set_learning_rate(self.optimizer, lr)
        self.grad_sync.finish()
        overflow = False
        if self.scaler is not None:  # every rank agrees on skipping (unscale_and_check reduces)
            overflow = unscale_and_check(self.params, scale=self.scaler.scale)
            self.scaler.update(overflow)  # raises Diverged at the minimum scale
        grad_norm = math.inf
        if not overflow:
            grad_norm = global_grad_norm(self.params, topo=self.topo)
            problem = problem or self.guard.norm_problem(grad_norm)
            if problem is None:
                clip_gradients(self.params, norm=grad_norm, max_norm=self.config.optimizer.clip_grad)
                self.optimizer.step()
        self.grad_sync.zero_grad()  # in place: gradients are views into its buffers
        return {"grad_norm": grad_norm, "skipped": overflow, "problem": problem}

    def weights_finite(self) -> bool:
        """Whether every rank's weights are finite (collective): checked before each save, so that
        no checkpoint is ever published with NaN or Inf in it."""
        local = self.zero.weights_finite() if self.zero else all(bool(p.isfinite().all()) for p in self.params)
        flag = torch.tensor([float(local)], device=self.topo.device)
        if self.topo.world_size > 1:
            with waiting():
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def train_state(self) -> dict:
        """What the trainer itself must carry across a resume (saved in meta.json): the divergence
        guard's loss history and counts; the fp16 loss scaler, ours or DeepSpeed's (equal on
        every rank: overflow decisions are global)."""
        state = {"guard": self.guard.state_dict()}
        if self.scaler is not None:
            state["loss_scaler"] = self.scaler.state_dict()
        if self.zero is not None and self.config.train.precision == "fp16":
            state["zero_loss_scaler"] = self.zero.loss_scaler_state()
        return state

    def load_train_state(self, state: dict, *, rollback: bool = False) -> None:
        """`rollback`: going back to an older checkpoint keeps the rollbacks already used."""
        self.guard.load_state_dict(state.get("guard", {}), keep_rollbacks=rollback)
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])
        if self.zero is not None and "zero_loss_scaler" in state:
            self.zero.load_loss_scaler_state(state["zero_loss_scaler"])

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first train.eval_iters validation micro-batches of each DP rank
        (the same ones every time, so evaluations are comparable)."""
        t = self.config.train
        for chunk in self.chunks:
            chunk.eval()
        loader = SampleLoader(
            self.valid,
            micro_batch_size=t.micro_batch_size,
            seed=t.seed,
            dp_rank=self.topo.dp_rank,
            dp_size=self.topo.dp,
            collate=self.collate,
            vocab_size=self.config.model.vocab_size,
        )
        iters = min(t.eval_iters, max(1, len(self.valid) // (t.micro_batch_size * self.topo.dp)))
        losses = forward_backward(
            chunks=self.chunks,
            topo=self.topo,
            batches=iter(loader),
            micro_batches=iters,
            progress=lambda operation: self.progress(f"evaluation: {operation}"),
            autocast=self.autocast,
            hidden_shape=self.hidden_shape,
            hidden_dtype=self.hidden_dtype,
            forward_only=True,
        )
        for chunk in self.chunks:
            chunk.train()
        return reduce_loss(torch.stack(losses).mean(), self.topo) if losses else math.nan
