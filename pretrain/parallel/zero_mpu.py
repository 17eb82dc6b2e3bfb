"""DeepSpeed's view of our Topology: the `mpu` it is handed, the marks on parameters its gradient
norm reads, and the process groups it needs (its one-rank group, its own groups' timeouts).

ZeRO shards over the ranks that hold the same weights: the mpu hands DeepSpeed the data x context
group as its data-parallel group (`topo.dp_cp_group`, the DP group without context parallelism;
CP ranks' gradients average like DP replicas', see pretrain/parallel/data.py), and the
model-parallel group (TP x PP) is where it sums the squared gradient norm, counting a
tensor-parallel shard on every TP rank and a replicated weight on TP rank 0 only.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from operator import attrgetter

import torch.distributed as dist
from torch import nn

from pretrain.models.sharding import sharding
from pretrain.parallel.bootstrap import group_timeout
from pretrain.parallel.topology import Topology

# Megatron's name of each parallel dimension -> how our Topology answers for it: (the group,
# this rank's index in it, its size). These become TopologyMPU's get_<name>_group/_rank/
# _world_size methods. Model parallel is one replica's TP x PP ranks, TP ranks contiguous.
_DIMENSIONS: dict[str, tuple[Callable[[Topology], object], ...]] = {
    "data_parallel": (attrgetter("dp_cp_group"), attrgetter("replica_rank"), attrgetter("replicas")),
    "model_parallel": (attrgetter("model_group"), lambda t: t.pp_rank * t.tp + t.tp_rank, lambda t: t.tp * t.pp),
    "tensor_model_parallel": (attrgetter("tp_group"), attrgetter("tp_rank"), attrgetter("tp")),
    "pipeline_model_parallel": (attrgetter("pp_group"), attrgetter("pp_rank"), attrgetter("pp")),
}


def _with_dimension_getters(cls: type) -> type:
    """Add the `_DIMENSIONS` getters to cls as plain methods (DeepSpeed calls them, and tests
    for some with hasattr, so they must exist on the class, not come from __getattr__)."""

    def getter(name: str, read: Callable[[Topology], object]) -> Callable:
        def method(self):
            return read(self.topo)

        method.__name__, method.__qualname__ = name, f"{cls.__qualname__}.{name}"
        return method

    for dimension, reads in _DIMENSIONS.items():
        for what, read in zip(("group", "rank", "world_size"), reads):
            name = f"get_{dimension}_{what}"
            setattr(cls, name, getter(name, read))
    return cls


@_with_dimension_getters
class TopologyMPU:
    """DeepSpeed's `mpu` interface (Megatron's names) answered from our Topology.

    Data parallel: the group ZeRO shards over (data x context). Model parallel: all TP x PP ranks of one replica,
    where DeepSpeed sums gradient norms and overflow flags. Tensor parallel: its rank decides which
    replicated weights count towards the norm (TP rank 0's). The get_<dimension>_group/_rank/
    _world_size methods of the four are generated from `_DIMENSIONS`."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo

    def get_data_parallel_group_ranks(self) -> list[int]:
        t = self.topo
        return [
            t.global_rank(tp_rank=t.tp_rank, cp_rank=c, dp_rank=d, pp_rank=t.pp_rank)
            for d in range(t.dp)
            for c in range(t.cp)
        ]

    def get_tensor_model_parallel_src_rank(self) -> int:
        t = self.topo
        return t.global_rank(tp_rank=0, cp_rank=t.cp_rank, dp_rank=t.dp_rank, pp_rank=t.pp_rank)


def mark_parameters(chunks: list[nn.Module]) -> None:
    """Tell DeepSpeed's norm which parameters are TP shards and which are pipeline copies."""
    for chunk in chunks:
        for param in chunk.parameters():
            if sharding(param).tp is not None:
                param.tensor_model_parallel = True  # a shard: every TP rank's part counts
            if sharding(param).tied_output_copy:
                param.ds_pipe_replicated = True  # the last stage's copy: counted on the first


def ensure_process_group(topo: Topology, *, timeout_minutes: float) -> None:
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
