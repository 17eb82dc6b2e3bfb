"""Which GPU this process uses: one rule, for every component.

Clusters hand GPUs to the tasks of a node in one of two ways:
- every task sees all of the node's GPUs (torchrun; srun with --gpus-per-node and no binding;
  mpirun), and each must pick its own by local rank: cuda:LOCAL_RANK;
- each task sees only its own GPU (srun --gpus-per-task=1 or --gpu-bind, or a wrapper setting
  CUDA_VISIBLE_DEVICES per rank), which is then cuda:0 whatever the local rank is.

`pick_device` decides once, from the launcher's local rank and local world size
(pretrain/launch.py) and the number of GPUs the task sees, and makes that GPU current. Every
other component uses the device it returns, or the current device it set: the trainer and the
process group, our Triton kernels (they launch on the current device), checkpoints (the RNG
state of that device only, see `cuda_rng_state`), and DeepSpeed, which binds
cuda:int(os.environ["LOCAL_RANK"]) on its own (engine._set_distributed_vars, ZeRO-3's
partition buffers) and is told our choice through that variable (`bind_deepspeed`). Before
this rule the trainer took cuda:(local_rank % count) and DeepSpeed cuda:LOCAL_RANK, which
disagree, or fail with "invalid device ordinal", as soon as a task sees one GPU.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import torch

from pretrain.config import ConfigError


def cuda_index(*, local_rank: int, local_world_size: int, visible: int) -> int:
    """The GPU index (among the `visible` ones) of local rank `local_rank` of `local_world_size`
    tasks on this node."""
    if visible == 1:
        return 0  # its own GPU (or the only one there is)
    if visible >= local_world_size:
        return local_rank
    raise ConfigError(
        f"train.device: this task (local rank {local_rank} of {local_world_size} tasks on this node) sees "
        f"{visible} GPUs: neither one GPU of its own nor one for every task of the node. Give each task "
        f"its own GPU (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per task), or let every task "
        f"see all of the node's GPUs (srun --gpus-per-node without per-task binding), or start at most "
        f"{visible} tasks per node (--ntasks-per-node)"
    )


def pick_device(choice: str, *, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """The device of train.device (`auto`, `cpu`, `cuda`) for this task; a GPU is made current."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but torch sees no GPU")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice != "cuda":
        return torch.device(choice)
    index = cuda_index(local_rank=local_rank, local_world_size=local_world_size, visible=torch.cuda.device_count())
    # Current for everything that does not name a device: NCCL, Triton launches, torch.cuda.*.
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def bind_deepspeed(device: torch.device, env: MutableMapping[str, str] | None = None) -> None:
    """Tell DeepSpeed our device before `deepspeed.initialize`: it reads the GPU index from
    LOCAL_RANK. Under Open MPI it also asserts LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK
    (engine._configure_with_arguments), so that one follows; the process group exists by then,
    and nothing else reads it afterwards. On CPU, LOCAL_RANK only has to exist."""
    env = os.environ if env is None else env
    if device.type != "cuda":
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        return
    index = str(device.index if device.index is not None else torch.cuda.current_device())
    env["LOCAL_RANK"] = index
    if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
        env["OMPI_COMM_WORLD_LOCAL_RANK"] = index


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The CUDA RNG state a checkpoint needs: that of this rank's own device only. (All visible
    devices' states, `get_rng_state_all`, would not restore where a task sees a different number
    of GPUs: one GPU per task has no device 5, and eight visible put cuda:0's state on device 0
    for every rank.)"""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_cuda_rng_state(state, device: torch.device) -> None:
    """Inverse of `cuda_rng_state`; also reads the list of all devices' states older checkpoints
    hold (its entry for this device, when it has one)."""
    if device.type != "cuda" or state is None:
        return
    if isinstance(state, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(state):
            return
        state = state[index]
    torch.cuda.set_rng_state(state, device)
