"""DeepSpeed ZeRO glue: the DeepSpeed config generated from ours, the `mpu` view of our Topology,
the combinations we refuse, and the driver that runs DeepSpeed's ZeRO optimizer under our own
pipeline executor.

DeepSpeed's engine is used as a factory only: `deepspeed.initialize` builds the ZeRO optimizer
(flat fp32 master partitions, gradient reduce hooks, 16-bit module casting, ZeRO-3 weight
partitioning) from a config we generate, so a user never writes a second config that could
disagree with ours. The forward and backward passes stay ours (`pretrain.parallel.pipeline`),
because the engine's own loop can only call backward on a loss, while a pipeline stage calls
it on an activation with a received gradient. What `engine.backward` adds around autograd is
reproduced per backward pass (see `ZeroEngine._backward_start/_backward_end`): loss scaling,
the ZeRO backward prologue, and the epilogue that flushes the reduce buckets (stages 2 and 3,
every micro-batch; stage 1 once, after the step's backward passes). When each gradient enters
the reduce buckets is decided by our own hooks (pretrain/parallel/zero_grads.py): stage 1
reduces during the last micro-batch's backward, sequence-parallel gradients are summed over TP
once per bucket.

ZeRO shards over the data-parallel group only: the mpu hands DeepSpeed `topo.dp_group`, and
the model-parallel group (TP x PP) is where it sums the squared gradient norm, counting a
tensor-parallel shard on every TP rank and a replicated weight on TP rank 0 only.

`import deepspeed` happens only when a ZeroEngine is built, so the rest of the framework runs
without it.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import math
import os
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from pretrain.checkpoint.state import PartitionedState
from pretrain.config import ConfigError, RunConfig
from pretrain.faults.divergence import Diverged
from pretrain.models.sharding import sharding
from pretrain.optim import (
    LOSS_SCALE_HYSTERESIS,
    LOSS_SCALE_INIT_POWER,
    LOSS_SCALE_MIN,
    LOSS_SCALE_WINDOW,
    BackwardRootChunk,
    build_optimizer,
)
from pretrain.parallel.topology import Topology, group_timeout
from pretrain.parallel.zero_grads import ZeroGradientRouter
from pretrain.parallel.zero_state import (
    Fragment,
    Reader,
    adam_step,
    ensure_adam_state,
    load_local_state,
    local_fragments,
)

INSTALL_HINT = "pip install -c constraints.txt -e '.[zero]' (with DS_BUILD_OPS=0 in the environment)"


def require_deepspeed(config: RunConfig) -> None:
    """Fail before any process group when a ZeRO run lacks DeepSpeed, or DeepSpeed refuses its
    precision on this device. Not part of the config's validation (ParallelConfig.validate):
    reading a ZeRO checkpoint's config (load_model) must not need DeepSpeed."""
    if not config.parallel.zero_stage:
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"parallel.zero_stage={config.parallel.zero_stage} needs DeepSpeed, which is not installed: {INSTALL_HINT}"
        )
    _check_precision_supported(config.train.precision)


def deepspeed_config(config: RunConfig, *, data_parallel: int, accumulation: int) -> dict:
    """The DeepSpeed config equivalent to our run config (printed at start, saved nowhere else)."""
    p, t, o = config.parallel, config.train, config.optimizer
    element_bytes = 4 if t.precision == "fp32" else 2
    # DeepSpeed counts elements, and wants a multiple of its (2-element) all-gather alignment.
    bucket = 64 * max(1, math.ceil(p.bucket_mb * 2**20 / element_bytes / 64))
    zero: dict = {
        "stage": p.zero_stage,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        # Our gradient hooks (ZeroGradientRouter) decide when each gradient enters DeepSpeed's
        # reduce buckets; with overlap_comm a full bucket is reduced on DeepSpeed's reduction
        # stream while the backward pass goes on (on a CPU, a synchronized device, inline).
        "overlap_comm": True,
    }
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if p.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = bucket
        zero["stage3_param_persistence_threshold"] = p.zero3_persistence_threshold
        if p.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": config.global_batch(data_parallel),
        "gradient_clipping": o.clip_grad,
        "zero_optimization": zero,
        # check_grad_overflow: a non-finite bf16 gradient skips the step as in fp16 and fp32.
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        # loss_scale 0 = dynamic; the same constants as our own scaler (pretrain/optim.py).
        "fp16": {
            "enabled": t.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": LOSS_SCALE_INIT_POWER,
            "loss_scale_window": LOSS_SCALE_WINDOW,
            "hysteresis": LOSS_SCALE_HYSTERESIS,
            "min_loss_scale": LOSS_SCALE_MIN,
        },
        # Our torch AdamW steps the offloaded state on the CPU; DeepSpeed's CPU Adam would first
        # compile a C++ op, and would make the update differ from a run without ZeRO.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # we log; DeepSpeed's own progress lines would interleave
        "wall_clock_breakdown": False,
    }


class TopologyMPU:
    """DeepSpeed's `mpu` interface (Megatron's names) answered from our Topology.

    Data parallel: the group ZeRO shards over. Model parallel: all TP x PP ranks of one replica,
    where DeepSpeed sums gradient norms and overflow flags. Tensor parallel: its rank decides which
    replicated weights count towards the norm (TP rank 0's)."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo

    def get_data_parallel_group(self):
        return self.topo.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.topo.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topo.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        t = self.topo
        return [t.global_rank(tp_rank=t.tp_rank, dp_rank=d, pp_rank=t.pp_rank) for d in range(t.dp)]

    def get_model_parallel_group(self):
        return self.topo.model_group

    def get_model_parallel_rank(self) -> int:
        return self.topo.pp_rank * self.topo.tp + self.topo.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.topo.tp * self.topo.pp

    def get_tensor_model_parallel_group(self):
        return self.topo.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.topo.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.topo.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        t = self.topo
        return t.global_rank(tp_rank=0, dp_rank=t.dp_rank, pp_rank=t.pp_rank)

    def get_pipeline_model_parallel_group(self):
        return self.topo.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.topo.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.topo.pp


def _mark_parameters(chunks: list[nn.Module], topo: Topology) -> None:
    """Tell DeepSpeed's norm which parameters are TP shards and which are pipeline copies."""
    for chunk in chunks:
        for param in chunk.parameters():
            if sharding(param).tp is not None:
                param.tensor_model_parallel = True  # a shard: every TP rank's part counts
            if sharding(param).tied_embedding and not topo.is_first_stage:
                param.ds_pipe_replicated = True  # the last stage's copy: counted on the first


def _check_precision_supported(precision: str) -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if precision == "fp16" and not accelerator.is_fp16_supported():
        raise ConfigError(
            f"train.precision: DeepSpeed does not support fp16 on this device "
            f"({accelerator.device_name()}; on a CPU it needs fp16 matmul support, e.g. "
            "AVX512-FP16 or AMX-FP16); use train.precision=bf16, or fp16 without ZeRO "
            "(parallel.zero_stage=0)"
        )
    if precision == "bf16" and not accelerator.is_bf16_supported():
        raise ConfigError(
            f"train.precision: DeepSpeed does not support bf16 on this device "
            f"({accelerator.device_name()}); use train.precision=fp16 or fp32"
        )


def _ensure_process_group(topo: Topology, *, timeout_minutes: float) -> None:
    """DeepSpeed needs torch.distributed even on one process (ZeRO-Offload on one GPU), and
    binds the GPU LOCAL_RANK names: make that our device (pretrain/device.py)."""
    from pretrain.device import bind_deepspeed

    bind_deepspeed(topo.device, os.environ)
    if topo.world_size == 1 and not dist.is_initialized():
        backend = "nccl" if topo.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(minutes=timeout_minutes)
        )


@contextlib.contextmanager
def groups_time_out_after(minutes: float) -> Iterator[None]:
    """Give any group created inside (DeepSpeed's own, e.g. its world clone, MoE or hpZ groups:
    `deepspeed.comm` calls `torch.distributed.new_group(ranks)` without a timeout) the run's
    timeout instead of the backend's 30-minute default. DeepSpeed offers no setting for it."""
    original = dist.new_group

    def new_group(*args, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = group_timeout(minutes)
        return original(*args, **kwargs)

    dist.new_group = new_group
    try:
        yield
    finally:
        dist.new_group = original


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
        self.ds_config = deepspeed_config(config, data_parallel=topo.dp, accumulation=accumulation)
        params = [p for chunk in chunks for p in chunk.parameters()]
        _mark_parameters(chunks, topo)
        _ensure_process_group(topo, timeout_minutes=config.parallel.timeout_minutes)
        _check_precision_supported(config.train.precision)
        # One module holding all of this rank's chunks: the engine flattens their parameters into
        # one ZeRO partition per parameter group.
        module = chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks)
        with groups_time_out_after(config.parallel.timeout_minutes):
            engine, optimizer, _, _ = deepspeed.initialize(
                model=module,
                optimizer=build_optimizer(params, config.optimizer),
                config=self.ds_config,
                mpu=TopologyMPU(topo) if topo.world_size > 1 else None,
                dist_init_required=False,
            )
        self.engine, self.optimizer = engine, optimizer
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
        return all(bool(flat.isfinite().all()) for flat in self._master_partitions())

    def _master_partitions(self) -> list[torch.Tensor]:
        opt = self.optimizer
        return list(opt.fp32_partitioned_groups_flat if self.stage == 3 else opt.single_partition_of_fp32_groups)

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

    # -- measurement (tests and bench/memory.py) ----------------------------------------------

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds: fp32 master partitions + Adam moments."""
        opt = self.optimizer
        tensors = self._master_partitions() + [
            t for s in opt.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1
        ]
        return _unique_bytes(tensors)

    def gradient_bytes(self) -> int:
        """Bytes of gradients this rank holds now: whole ones on the parameters (stage 1 until
        finish_gradients) and ZeRO's partitioned accumulation buffers (stages 2, 3; stage 1
        after the reduction). Reduce buckets (parallel.bucket_mb) are not counted."""
        opt = self.optimizer
        tensors = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        for holder in (getattr(opt, "averaged_gradients", None) or {}).values():
            tensors += [t for t in holder or [] if torch.is_tensor(t)]
        for name in ("grads_in_partition", "grad_partitions_flat_buffer"):
            if torch.is_tensor(getattr(opt, name, None)):
                tensors.append(getattr(opt, name))
        return _unique_bytes(tensors)

    def weight_bytes(self) -> int:
        """Bytes of model weights this rank holds at rest (ZeRO-3: its shards)."""
        total = 0
        for param in self.engine.module.parameters():
            shard = getattr(param, "ds_tensor", None)
            total += shard.numel() * shard.element_size() if shard is not None else param.numel() * param.element_size()
        return total


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
