"""The trainer: what one optimizer step needs, built once (`Trainer.step`, `Trainer.evaluate`).

pretrain/train.py builds it and runs the loop around it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from pretrain.config import RunConfig
from pretrain.data.loader import SampleDataset, SampleLoader
from pretrain.faults.divergence import DivergenceGuard
from pretrain.optim import (
    learning_rate,
)
from pretrain.parallel.data import reduce_loss, shared_loss
from pretrain.parallel.pipeline import forward_backward
from pretrain.parallel.topology import Topology
from pretrain.parallel.waits import waiting
from pretrain.strategy import build_strategy


class Trainer:
    """What one step needs, built once; `step()` and `evaluate()` are the loop's two verbs.

    The training strategy (pretrain/strategy.py: plain data parallelism or DeepSpeed ZeRO) owns
    the optimizer, the gradient reduction, clipping and loss scaling; the schedule, data, loss
    and the divergence guard are the same code whichever it is."""

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
        self.num_params = sum(p.numel() for chunk in chunks for p in chunk.parameters())  # before ZeRO-3 partitions
        self.accum = config.accumulation_steps(topo.dp)
        self.strategy = build_strategy(config, topo, chunks, accumulation=self.accum)
        dtype, device_type = config.compute_dtype, topo.device.type
        mixed = dtype != torch.float32
        self.autocast = lambda: torch.autocast(device_type, dtype=dtype if mixed else torch.bfloat16, enabled=mixed)
        # A stage's activations: this rank's share of the sequence (context parallelism), split
        # again over the TP ranks under sequence parallelism.
        seq = config.model.seq_length // topo.cp // (topo.tp if topo.sequence_parallel else 1)
        self.hidden_shape = (config.train.micro_batch_size, seq, config.model.hidden_size)
        self.hidden_dtype = dtype  # what activations travel in between stages
        self.guard = DivergenceGuard(config.faults)

    def step(self, step: int) -> dict:
        """One optimizer step, or a skipped one: `bad_step` says why (every rank judges the same
        loss and gradient norm, so all skip together)."""
        c = self.config
        lr = learning_rate(step, optim=c.optimizer, schedule=c.schedule, total_steps=c.train.steps)
        losses = forward_backward(
            chunks=self.strategy.chunks,
            topo=self.topo,
            batches=self.batches,
            progress=self.progress,
            micro_batches=self.accum,
            autocast=self.autocast,
            hidden_shape=self.hidden_shape,
            hidden_dtype=self.hidden_dtype,
            on_last_backward=self.strategy.on_last_backward,
        )
        self.progress("optimizer")
        loss = shared_loss(losses, self.topo)
        record = self.strategy.step(lr, problem=self.guard.loss_problem(loss), norm_problem=self.guard.norm_problem)
        problem = record.pop("problem")
        self.guard.record(loss, problem)
        return {"loss": loss, "lr": lr, **record, "bad_step": problem, "skipped_steps": self.guard.skipped_total}

    def weights_finite(self) -> bool:
        """Whether every rank's weights are finite (collective): checked before each save, so that
        no checkpoint is ever published with NaN or Inf in it."""
        flag = torch.tensor([float(self.strategy.weights_finite())], device=self.topo.device)
        if self.topo.world_size > 1:
            with waiting():
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def train_state(self) -> dict:
        """What the trainer itself must carry across a resume (saved in meta.json): the divergence
        guard's loss history and counts, and the strategy's own (the fp16 loss scaler; equal on
        every rank: overflow decisions are global)."""
        return {"guard": self.guard.state_dict(), **self.strategy.state_dict()}

    def load_train_state(self, state: dict, *, rollback: bool = False) -> None:
        """`rollback`: going back to an older checkpoint keeps the rollbacks already used."""
        self.guard.load_state_dict(state.get("guard", {}), keep_rollbacks=rollback)
        self.strategy.load_state_dict(state)

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
