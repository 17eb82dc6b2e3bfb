"""Rank discovery from each launcher's environment, and a clear failure when the master is
unreachable (pretrain/launch.py)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from parallel_harness import free_port

from pretrain.launch import LaunchError, discover, tasks_per_node

ROOT = Path(__file__).resolve().parents[1]


def assert_fields(launch, **expected) -> None:
    """The named fields of what discover() found have the expected values."""
    assert {name: getattr(launch, name) for name in expected} == expected


def test_torchrun_environment():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "1234",
        "TORCHELASTIC_RUN_ID": "x",
    }
    assert_fields(
        discover(env),
        launcher="torchrun",
        rank=3,
        world_size=8,
        local_rank=1,
        local_world_size=2,
        master_addr="node7",
        master_port=1234,
    )


def test_srun_environment_takes_master_from_the_node_list(monkeypatch):
    expanded = []
    monkeypatch.setattr(
        "pretrain.launch.slurm_hostnames", lambda nodelist: expanded.append(nodelist) or ["gpu001", "gpu002", "gpu003"]
    )
    monkeypatch.setattr("pretrain.launch.slurm_node_address", lambda node: f"{node}.cluster")
    env = {
        "SLURM_PROCID": "5",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "12",
        "SLURM_NTASKS": "12",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2),4",
        "SLURM_STEP_NODELIST": "gpu[001-003]",
        "SLURM_JOB_ID": "123456",
        "SLURMD_NODENAME": "gpu003",
    }
    launch = discover(env)
    assert expanded == ["gpu[001-003]"]
    assert_fields(
        launch,
        launcher="srun",
        rank=5,
        world_size=12,
        local_rank=1,
        local_world_size=4,
        master_addr="gpu001.cluster",
        node="gpu003",
    )
    assert launch.master_port == 20000 + 123456 % 20000  # the same on every task, and after a requeue
    assert discover({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "999"}).master_addr == "10.0.0.1"
    # The batch shell (no step) is not a training task: it runs as a single process.
    batch = {k: v for k, v in env.items() if k not in ("SLURM_STEP_ID",)}
    assert discover(batch).launcher == "single"


def test_tasks_per_node_format():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("8") == [8]
    with pytest.raises(LaunchError, match="cannot parse"):
        tasks_per_node("x")


def test_mpirun_environments():
    ompi = {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "4000",
    }
    assert_fields(discover(ompi), launcher="mpirun", rank=1, world_size=2, local_rank=1, master_port=4000)
    mpich = {
        "PMI_RANK": "0",
        "PMI_SIZE": "4",
        "MPI_LOCALRANKID": "0",
        "MPI_LOCALNRANKS": "2",
        "MASTER_ADDR": "head",
        "MASTER_PORT": "4000",
    }
    assert (discover(mpich).world_size, discover(mpich).local_world_size) == (4, 2)


def test_single_process_and_bad_values():
    assert discover({}).launcher == "single" and discover({}).world_size == 1
    with pytest.raises(LaunchError, match="RANK='x' is not an integer"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})


def test_unreachable_master_fails_within_the_timeout_naming_the_address(stdlib_data, tmp_path):
    """Rank 1 of 2 with no master listening: exits 2 after parallel.timeout_minutes (6 s) with
    the address in the message, instead of hanging."""
    port = free_port()  # closed again: nobody listens there
    env = {
        **os.environ,
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    start = time.time()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.train",
            "configs/gpt_tiny.yaml",
            "parallel.timeout_minutes=0.1",
            f"data.path={stdlib_data['prefix']}",
            f"data.tokenizer={stdlib_data['tokenizer']}",
            "model.vocab_size=2000",
            f"logging.dir={tmp_path}",
            f"checkpoint.dir={tmp_path}/ckpt",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.time() - start
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        f"rank 1 of 2 (torchrun, node {socket.gethostname()}) could not reach the master at 127.0.0.1:{port} "
        "within 0.1 min" in result.stderr
    )
    assert took < 60


def test_train_sh_puts_the_triton_cache_on_node_local_disk_per_job(tmp_path):
    """launch/train.sh: every rank compiling Triton kernels into one shared home-directory cache
    contends on it; the cache goes under $TMPDIR, one per job, unless the user set one."""
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho "$TRITON_CACHE_DIR"\n')
    fake_python.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_CACHE_DIR", "SLURM_JOB_ID")}

    def cache_dir(**env: str) -> str:
        return subprocess.run(
            ["bash", str(ROOT / "launch/train.sh")],
            env={**base, "PYTHON": str(fake_python), **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    assert cache_dir(TMPDIR="/local/job7", SLURM_JOB_ID="7", USER="ana") == "/local/job7/pretrain-triton-ana-7"
    assert cache_dir(TRITON_CACHE_DIR="/mine") == "/mine"
    assert cache_dir(TMPDIR="/scratch").startswith("/scratch/pretrain-triton-")
