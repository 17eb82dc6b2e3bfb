"""One device rule (pretrain/device.py), checked without a GPU: torch.cuda's answers are
monkeypatched to what a task sees on a node with 8 GPUs, with its own GPU only, or with too few."""

import types

import pytest
import torch

from pretrain.config import ConfigError
from pretrain.device import bind_deepspeed, cuda_index, cuda_rng_state, pick_device, restore_cuda_rng_state
from pretrain.launch import discover


@pytest.fixture
def gpus(monkeypatch):
    """gpus(n): torch sees n GPUs; returns the list of set_device calls."""
    calls = []

    def see(n: int) -> list:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(int(index)))
        return calls

    return see


def srun_env(local_rank: int, tasks_per_node: int) -> dict:
    return {
        "SLURM_PROCID": str(8 + local_rank),
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_LOCALID": str(local_rank),
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x2)",
        "MASTER_ADDR": "n1",
        "SLURM_JOB_ID": "7",
    }


def test_every_task_sees_all_gpus_picks_its_local_rank(gpus):
    calls = gpus(8)
    launch = discover(srun_env(5, 8))
    device = pick_device("auto", local_rank=launch.local_rank, local_world_size=launch.local_world_size)
    assert device == torch.device("cuda", 5) and calls == [5]


def test_a_task_with_its_own_gpu_uses_cuda_0(gpus):
    """srun --gpus-per-task=1: local rank 5 sees one GPU, which is cuda:0 (the old rule's
    local_rank % count agreed here, but DeepSpeed's cuda:LOCAL_RANK did not)."""
    calls = gpus(1)
    launch = discover(srun_env(5, 8))
    assert pick_device("cuda", local_rank=launch.local_rank, local_world_size=launch.local_world_size) == torch.device(
        "cuda", 0
    )
    assert calls == [0]


def test_too_few_gpus_for_the_tasks_of_a_node_fails_with_what_to_do(gpus):
    gpus(2)
    with pytest.raises(ConfigError, match=r"local rank 3 of 4 tasks.*sees 2 GPUs.*--gpus-per-task=1"):
        pick_device("auto", local_rank=3, local_world_size=4)
    # More GPUs than tasks is fine: each task takes the one of its local rank.
    assert cuda_index(local_rank=3, local_world_size=4, visible=8) == 3


def test_cpu_and_no_gpu(gpus):
    gpus(0)
    assert pick_device("auto", local_rank=3, local_world_size=4) == torch.device("cpu")
    with pytest.raises(ConfigError, match="torch sees no GPU"):
        pick_device("cuda")
    gpus(8)
    assert pick_device("cpu", local_rank=3, local_world_size=8) == torch.device("cpu")


@pytest.mark.parametrize("visible,expected", [(8, 5), (1, 0)])
def test_deepspeed_binds_the_same_gpu(gpus, monkeypatch, visible, expected):
    """DeepSpeed reads its GPU from LOCAL_RANK (after launch.export set it to the local rank);
    the ZeRO glue rewrites it to our device, and DeepSpeed's own argument handling (the Open MPI
    consistency assert included) ends up on that index."""
    deepspeed_engine = pytest.importorskip("deepspeed.runtime.engine")
    from pretrain.parallel.topology import single_process
    from pretrain.parallel.zero_mpu import ensure_process_group

    gpus(visible)
    device = pick_device("cuda", local_rank=5, local_world_size=8)
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "5")
    topo = single_process(device)
    topo = types.SimpleNamespace(**{**vars(topo), "world_size": 2})  # a process group exists already
    ensure_process_group(topo, timeout_minutes=10)
    engine = types.SimpleNamespace()
    deepspeed_engine.DeepSpeedEngine._configure_with_arguments(engine, None, None)
    assert engine.local_rank == expected == device.index


def test_deepspeed_on_cpu_keeps_the_local_rank():
    env = {"SLURM_LOCALID": "3"}
    bind_deepspeed(torch.device("cpu"), env)
    assert env["LOCAL_RANK"] == "3"
    env = {"LOCAL_RANK": "1"}
    bind_deepspeed(torch.device("cpu"), env)
    assert env["LOCAL_RANK"] == "1"


def test_checkpoint_rng_is_this_devices_only(monkeypatch):
    states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(8)}
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[device.index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state), device)))
    cuda5 = torch.device("cuda", 5)
    assert int(cuda_rng_state(cuda5)) == 5 and cuda_rng_state(torch.device("cpu")) is None
    restore_cuda_rng_state(states[5], cuda5)
    restore_cuda_rng_state(list(states.values()), cuda5)  # an older checkpoint: every device's state
    restore_cuda_rng_state(list(states.values())[:1], cuda5)  # saved where one GPU was visible: none for 5
    restore_cuda_rng_state(None, torch.device("cpu"))
    assert restored == [(5, cuda5), (5, cuda5)]
