"""DeepSpeed ZeRO driver: runs DeepSpeed's ZeRO optimizer under our own pipeline executor.

DeepSpeed's engine is used as a factory only: `deepspeed.initialize` builds the ZeRO optimizer
(flat fp32 master partitions, gradient reduce hooks, 16-bit module casting, ZeRO-3 weight
partitioning) from a config we generate (pretrain/parallel/zero_config.py), handed our topology
as its `mpu` (pretrain/parallel/zero_mpu.py). The forward and backward passes stay ours
(`pretrain.parallel.pipeline`), because the engine's own loop can only call backward on a loss,
while a pipeline stage calls it on an activation with a received gradient. What
`engine.backward` adds around autograd is reproduced per backward pass (see
`ZeroEngine._backward_start/_backward_end`): loss scaling, the ZeRO backward prologue, and the
epilogue that flushes the reduce buckets (stages 2 and 3, every micro-batch; stage 1 once,
after the step's backward passes). When each gradient enters the reduce buckets is decided by
our own hooks (pretrain/parallel/zero_grads.py): stage 1 reduces during the last micro-batch's
backward, sequence-parallel gradients are summed over TP once per bucket. Under expert
parallelism the routed experts go in DeepSpeed's expert parameter groups, partitioned and reduced
over the ranks holding the same experts (pretrain/parallel/zero_experts.py).

`import deepspeed` happens only when a ZeroEngine is built, so the rest of the framework runs
without it.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from pretrain.checkpoint.state import PartitionedState
from pretrain.config import RunConfig
from pretrain.faults.divergence import Diverged
from pretrain.optim import LOSS_SCALE_MIN, BackwardRootChunk, build_optimizer
from pretrain.parallel import zero_memory
from pretrain.parallel.topology import Topology
from pretrain.parallel.zero_config import check_precision_supported, deepspeed_config, require_deepspeed
from pretrain.parallel.zero_grads import ZeroGradientRouter
from pretrain.parallel.zero_mpu import TopologyMPU, ensure_process_group, groups_time_out_after, mark_parameters
from pretrain.parallel.zero_state import (
    Fragment,
    Reader,
    adam_step,
    ensure_adam_state,
    fp32_partitions,
    load_local_state,
    local_fragments,
)


class ZeroEngine:
    """This rank's ZeRO optimizer over its model chunks, driven around our pipeline executor.

    Per optimizer step: `forward_backward(chunks=engine.chunks, on_last_backward=
    engine.on_last_backward, ...)`, then `engine.step(lr)`.
    """

    def __init__(self, config: RunConfig, topo: Topology, chunks: list[nn.Module], *, accumulation: int) -> None:
        import deepspeed  # lazy: only ZeRO runs need it

        # DeepSpeed 0.19.8 calls torch's deprecated all_gather_into_tensor on every step; the
        # warning is not actionable for our users and would be printed by every rank.
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

        self.config, self.topo, self.stage = config, topo, config.parallel.zero_stage
        self.model_chunks = chunks
        self.ds_config = deepspeed_config(config, data_parallel=topo.replicas, accumulation=accumulation)
        params = [p for chunk in chunks for p in chunk.parameters()]
        mark_parameters(chunks)
        ensure_process_group(topo, timeout_minutes=config.parallel.timeout_minutes)
        check_precision_supported(config.train.precision)
        # One module holding all of this rank's chunks: the engine flattens their parameters into
        # one ZeRO partition per parameter group.
        module = chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks)
        optimizer = build_optimizer(params, config.optimizer)
        if topo.ep > 1:  # experts in DeepSpeed's expert parameter groups, over our groups
            from pretrain.parallel.zero_experts import prepare_expert_groups  # imports deepspeed

            module = prepare_expert_groups(
                chunks,
                optimizer,
                topo,
                num_experts=config.model.moe.num_experts,
                timeout_minutes=config.parallel.timeout_minutes,
            )
        with groups_time_out_after(config.parallel.timeout_minutes):
            engine, optimizer, _, _ = deepspeed.initialize(
                model=module,
                optimizer=optimizer,
                config=self.ds_config,
                mpu=TopologyMPU(topo) if topo.world_size > 1 else None,
                dist_init_required=False,
            )
        self.engine, self.optimizer = engine, optimizer
        self._params = list(engine.module.parameters())  # the same objects from here on (ZeRO-3 too)
        # The engine would run its backward epilogue from the optimizer's gradient hooks; ours
        # runs instead (once per backward pass, with the boundary we decide), and our own hooks
        # decide when each gradient is reduced (pretrain/parallel/zero_grads.py).
        optimizer.unregister_grad_acc_post_hooks()
        self.grads = ZeroGradientRouter(
            optimizer,
            stage=self.stage,
            chunks=chunks,
            topo=topo,
            bucket_elements=self.ds_config["zero_optimization"]["reduce_bucket_size"],
        )
        self.chunks = [
            BackwardRootChunk(chunk, scale=self._loss_scale, on_start=self._backward_start) for chunk in chunks
        ]
        self._announced = 0  # chunks whose last backward of the step has been announced
        self._finished = False  # finish_gradients() ran this step

    # -- the per-backward protocol (what engine.backward does around autograd) ------------------

    @staticmethod
    def check_environment(config: RunConfig) -> None:
        require_deepspeed(config)

    @staticmethod
    def weight_dtype(config: RunConfig) -> torch.dtype:
        # DeepSpeed holds the fp32 masters itself and casts the module to 16 bits anyway (its
        # buffers stay fp32): building in 16 bits saves the fp32 copy.
        return config.compute_dtype

    def _loss_scale(self) -> float:
        return float(self.optimizer.loss_scale) if self.config.train.precision == "fp16" else 1.0

    def on_last_backward(self, chunk: int) -> None:
        """Called by the schedule right before a chunk's last backward of the step."""
        self._announced += 1
        self.grads.start_last_backward(chunk)

    def _backward_start(self) -> None:
        """First node of every backward pass: ZeRO's prologue, then its epilogue queued for when
        autograd has finished this pass (after every gradient hook)."""
        opt = self.optimizer
        # After the final chunk's last backward is announced, the pass that follows is the last
        # one of the step: stage 2/3 turn their accumulated partitions into the step's gradient.
        # Stage 1 reduces from its first chunk's last backward on, which DeepSpeed allows only at
        # the boundary.
        boundary = self._announced == len(self.chunks)
        opt.clear_backward_seen_flag()
        opt.backward_prologue()
        opt.enter_backward()
        opt.set_gradient_accumulation_boundary(boundary if self.stage >= 2 else self.grads.reducing)
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)

    def _backward_end(self) -> None:
        opt = self.optimizer
        if self.stage >= 2:
            self.grads.end_backward()
            opt.overlapping_partition_gradients_reduce_epilogue()
        opt.backward_epilogue()
        opt.exit_backward()

    def finish_gradients(self) -> None:
        """After the step's backward passes. Stage 1 reduced its full buckets during the last
        micro-batch's backward: sum the tied embedding copies, then reduce them and the last
        bucket over the DP group into this rank's partition. Stages 2 and 3 did it all during
        the backward passes."""
        if self.stage == 1 and not self._finished:
            self.optimizer.set_gradient_accumulation_boundary(True)
            self.grads.finish()
            self.optimizer.overlapping_partition_gradients_reduce_epilogue()
        self._finished = True

    def step(self, lr: float, *, problem: str | None = None, norm_problem=lambda norm: None) -> dict:
        """Finish the gradients, clip and step inside ZeRO (the TrainingStrategy protocol,
        pretrain/strategy.py). `problem`: the loss condemned the step: drop its gradients without
        an update. DeepSpeed decides on the gradients itself: an overflow skips the step (fp16:
        the loss scaler's business; otherwise non-finite gradients, a problem)."""
        record = self._step(lr, skip=problem is not None)
        fp16 = self.config.train.precision == "fp16"
        if problem is None and record["skipped"] and not fp16:
            problem = norm_problem(record["grad_norm"])
        record["problem"] = problem
        if fp16:
            record["loss_scale"] = float(self.optimizer.loss_scale)
        else:
            del record["skipped"]
        return record

    def _step(self, lr: float, *, skip: bool) -> dict:
        opt = self.optimizer
        self.finish_gradients()
        for group in opt.param_groups:
            group["lr"] = lr
        with self._forced_overflow() if skip else contextlib.nullcontext():
            opt.step()
        skipped = bool(getattr(opt, "overflow", False))
        norm = getattr(opt, "_global_grad_norm", None)  # set by step (what engine.step reads too)
        opt.zero_grad(set_to_none=True)
        opt.set_gradient_accumulation_boundary(False)
        self.grads.reset()
        self._announced, self._finished = 0, False
        if skipped and not skip and self.config.train.precision == "fp16" and opt.loss_scale <= LOSS_SCALE_MIN:
            raise Diverged(
                f"fp16 loss scale is at its minimum ({LOSS_SCALE_MIN}) and the gradients still "
                "overflow; train with train.precision=bf16"
            )
        grad_norm = math.inf if skipped else float(norm) if norm is not None else math.nan
        return {"grad_norm": grad_norm, "skipped": skipped}

    @contextlib.contextmanager
    def _forced_overflow(self) -> Iterator[None]:
        """Make DeepSpeed's step take its own overflow path (drop the gradients, no update) as
        if the gradients were not finite, leaving the fp16 loss scale as it was: a bad step is
        not the scale's fault. Stage 3 decides overflow in one method, stages 1/2 in another."""
        opt, scale = self.optimizer, self.loss_scaler_state()
        names = (
            ("_overflow_check_and_loss_scale_update",) if self.stage == 3 else ("check_grad_overflow", "has_overflow")
        )
        saved = {name: opt.__dict__[name] for name in names if name in opt.__dict__}
        if self.stage == 3:
            opt._overflow_check_and_loss_scale_update = lambda update_scale=True: setattr(opt, "overflow", True)
        else:
            opt.check_grad_overflow, opt.has_overflow = True, lambda *args, **kwargs: True
        try:
            yield
        finally:
            for name in names:
                opt.__dict__.pop(name, None)
            opt.__dict__.update(saved)
            self.load_loss_scaler_state(scale)

    def weights_finite(self) -> bool:
        """Whether this rank's fp32 master weights are all finite (no communication)."""
        return all(bool(flat.isfinite().all()) for flat in fp32_partitions(self.optimizer, self.stage))

    # -- checkpoints: this rank's own share, nothing gathered (pretrain/parallel/zero_state.py) --

    def local_fragments(self, chunk: nn.Module, *, with_state: bool = True) -> list[Fragment]:
        """This rank's fragments of chunk's fp32 master weights (and Adam moments): views of
        DeepSpeed's partitions. No communication."""
        if with_state:
            ensure_adam_state(self.optimizer, self.stage)
        return local_fragments(self.optimizer, self.stage, chunk, with_state=with_state)

    def adam_step(self) -> float:
        return adam_step(self.optimizer)

    def load_local_state(self, chunks: list[nn.Module], *, read: Reader, step: float | None) -> None:
        """Set this rank's fragments from `read(name, key, start, numel)` (and the Adam moments
        and step when `step` is given); the module's weights follow from the masters.
        Collective over the DP group (stages 1/2 all-gather the 16-bit weights)."""
        load_local_state(self.optimizer, self.stage, chunks, read=read, step=step)

    def checkpoint_state(self) -> PartitionedState:
        return PartitionedState(self.model_chunks, self)

    def state_dict(self) -> dict:
        """The fp16 loss scaler, under its own key: a run without ZeRO keeps its scaler elsewhere."""
        return {"zero_loss_scaler": self.loss_scaler_state()} if self.config.train.precision == "fp16" else {}

    def load_state_dict(self, state: dict) -> None:
        if "zero_loss_scaler" in state:
            self.load_loss_scaler_state(state["zero_loss_scaler"])

    def describe(self) -> str:
        return f"DeepSpeed config: {json.dumps(self.ds_config)}"

    def loss_scaler_state(self) -> dict:
        """The fp16 dynamic loss scaler (plain numbers, for meta.json)."""
        scaler = getattr(self.optimizer, "loss_scaler", None)
        return {k: v for k, v in vars(scaler).items() if isinstance(v, (int, float, bool))} if scaler else {}

    def load_loss_scaler_state(self, state: dict) -> None:
        scaler = getattr(self.optimizer, "loss_scaler", None)
        for key, value in state.items():
            if scaler is not None and hasattr(scaler, key):
                setattr(scaler, key, value)

    # -- measurement (tests and bench/memory.py; pretrain/parallel/zero_memory.py) ----------------

    def optimizer_state_bytes(self) -> int:
        return zero_memory.optimizer_state_bytes(self.optimizer, self.stage)

    def gradient_bytes(self) -> int:
        return zero_memory.gradient_bytes(self.optimizer, self.engine.module)

    def weight_bytes(self) -> int:
        return zero_memory.weight_bytes(self.engine.module)

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        return zero_memory.held_tensors(self.optimizer, self.stage, self._params)
