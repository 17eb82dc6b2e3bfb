"""What a ZeRO rank holds in memory, measured from DeepSpeed's buffers (for tests and
bench/memory.py; ZeroEngine answers with these). Tensors sharing a storage count once."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.parallel.zero_state import fp32_partitions


def optimizer_state_tensors(optimizer, stage: int) -> list[torch.Tensor]:
    """The optimizer state this rank holds: fp32 master partitions + Adam moments."""
    return list(fp32_partitions(optimizer, stage)) + [
        t for s in optimizer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1
    ]


def gradient_tensors(optimizer, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The gradients this rank holds now: whole ones on the parameters (stage 1 until
    finish_gradients) and ZeRO's partitioned accumulation buffers (stages 2, 3; stage 1
    after the reduction). Reduce buckets (parallel.bucket_mb) are not among them."""
    tensors = [p.grad for p in params if p.grad is not None]
    for holder in (getattr(optimizer, "averaged_gradients", None) or {}).values():
        tensors += [t for t in holder or [] if torch.is_tensor(t)]
    for name in ("grads_in_partition", "grad_partitions_flat_buffer"):
        if torch.is_tensor(getattr(optimizer, name, None)):
            tensors.append(getattr(optimizer, name))
    return tensors


def held_tensors(optimizer, stage: int, params: list[nn.Parameter]) -> dict[str, list[torch.Tensor]]:
    """What this rank holds now by category, for pretrain/planner/live_memory.py: the weights
    (ZeRO-3: its shards, and whatever is gathered now), the gradients (the fp32 partitions' own,
    set for the length of the step, too), the optimizer state. `params`: the module's
    parameters (asked often during a measured step: walking the module each time is slow)."""
    masters = fp32_partitions(optimizer, stage)
    shards = [p.ds_tensor for p in params if getattr(p, "ds_tensor", None) is not None]
    return {
        "weights": [*params, *shards],
        "gradients": gradient_tensors(optimizer, params) + [m.grad for m in masters if m.grad is not None],
        "optimizer": optimizer_state_tensors(optimizer, stage),
    }


def optimizer_state_bytes(optimizer, stage: int) -> int:
    """Bytes of optimizer state this rank holds: fp32 master partitions + Adam moments."""
    return _unique_bytes(optimizer_state_tensors(optimizer, stage))


def gradient_bytes(optimizer, module: nn.Module) -> int:
    """Bytes of gradients this rank holds now (gradient_tensors)."""
    return _unique_bytes(gradient_tensors(optimizer, list(module.parameters())))


def weight_bytes(module: nn.Module) -> int:
    """Bytes of model weights this rank holds at rest (ZeRO-3: its shards)."""
    total = 0
    for param in module.parameters():
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
