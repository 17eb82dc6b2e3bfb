"""Rank discovery and process-group start, whoever launched us: torchrun, srun, mpirun or nobody.

`python -m pretrain.train` is the one entry under every launcher (launch/train.sh wraps it for
scripts). Each launcher announces ranks in its own variables:
- torchrun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
- srun (one task per GPU): SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID,
  SLURM_STEP_TASKS_PER_NODE; the master is the first host of the step's node list
  (`scontrol show hostnames`), the port derived from the job id, so every task computes the
  same address without talking;
- mpirun: OMPI_COMM_WORLD_* (Open MPI) or PMI_RANK / PMI_SIZE / MPI_LOCALRANKID (MPICH);
  the master address and port come from rank 0 over MPI when mpi4py is installed, else from
  MASTER_ADDR / MASTER_PORT, else (all ranks on one node) 127.0.0.1.
MASTER_ADDR and MASTER_PORT, when set, win everywhere.

The process group gets a timeout (parallel.timeout_minutes): a rank that cannot reach the
master fails after it with a message naming the address, instead of hanging; so does a
collective that never completes.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import torch.distributed as dist


class LaunchError(ValueError):
    """The launcher's environment is inconsistent, or the master cannot be reached."""


@dataclass(frozen=True)
class Launch:
    launcher: str  # torchrun | srun | mpirun | single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    node: str  # this node's name, for the per-node line

    def export(self) -> None:
        """Set the torch.distributed env:// variables (DeepSpeed and child tools read them)."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


DEFAULT_PORT = 29500


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for name in names:
        if env.get(name, "") != "":
            try:
                return int(env[name])
            except ValueError:
                raise LaunchError(f"{name}={env[name]!r} is not an integer") from None
    if default is None:
        raise LaunchError(f"none of {', '.join(names)} is set")
    return default


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed task counts, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"cannot parse SLURM tasks per node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slurm_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames` of a SLURM node list such as 'gpu[001-004],login1'."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(
            f"cannot expand the SLURM node list {nodelist!r} with `scontrol show hostnames`: "
            f"{e}; set MASTER_ADDR to the first node's address"
        ) from None
    return out.split()


def _resolvable(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except OSError:
        return False


def slurm_node_address(node: str) -> str:
    """The address SLURM itself reaches `node` at (its NodeAddr), for node names that do not
    resolve through DNS or /etc/hosts."""
    if _resolvable(node):
        return node
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", "-o", node], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(
            f"node {node} does not resolve and `scontrol show node` failed ({e}); set MASTER_ADDR"
        ) from None
    m = re.search(r"\bNodeAddr=(\S+)", out)
    if not m:
        raise LaunchError(f"node {node} does not resolve and has no NodeAddr; set MASTER_ADDR")
    return m.group(1)


def _torchrun(env: Mapping[str, str]) -> Launch:
    return Launch(
        "torchrun",
        rank=_int(env, "RANK"),
        world_size=_int(env, "WORLD_SIZE"),
        local_rank=_int(env, "LOCAL_RANK", default=0),
        local_world_size=_int(env, "LOCAL_WORLD_SIZE", default=_int(env, "WORLD_SIZE")),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(env, "MASTER_PORT", default=DEFAULT_PORT),
        node=socket.gethostname(),
    )


def _srun(env: Mapping[str, str]) -> Launch:
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    node_id = _int(env, "SLURM_NODEID", default=0)
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    local_world = tasks_per_node(spec)[node_id] if spec else 1
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchError("srun task without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST; set MASTER_ADDR")
        addr = slurm_node_address(slurm_hostnames(nodelist)[0])
    # Same job id -> same port on every task (and again after a requeue); spread over
    # 20000-39999 so that jobs sharing a node rarely collide. MASTER_PORT overrides it.
    port = _int(env, "MASTER_PORT", default=20000 + _int(env, "SLURM_JOB_ID", default=0) % 20000)
    return Launch(
        "srun",
        rank=_int(env, "SLURM_PROCID"),
        world_size=world,
        local_rank=_int(env, "SLURM_LOCALID"),
        local_world_size=local_world,
        master_addr=addr,
        master_port=port,
        node=env.get("SLURMD_NODENAME") or socket.gethostname(),
    )


def _mpirun(env: Mapping[str, str]) -> Launch:
    rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    world = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0)
    local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=world)
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not (addr and port):
        found = _master_from_mpi(rank)
        if found is not None:
            addr, port = addr or found[0], port or found[1]
        elif local_world == world:  # every rank on this node
            addr = addr or "127.0.0.1"
        elif not addr:
            raise LaunchError(
                "mpirun across nodes: set MASTER_ADDR (rank 0's address) or install mpi4py "
                "(`pip install mpi4py`) so that rank 0 can announce it"
            )
    return Launch(
        "mpirun",
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        master_addr=addr,
        master_port=int(port or DEFAULT_PORT),
        node=socket.gethostname(),
    )


def _master_from_mpi(rank: int) -> tuple[str, str] | None:
    """Rank 0's address and a port free there, broadcast over MPI (None without mpi4py)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    found = None
    if rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            free_port = s.getsockname()[1]
        found = (socket.gethostbyname(socket.gethostname()), str(free_port))
    return MPI.COMM_WORLD.bcast(found, root=0)


def discover(env: Mapping[str, str] = os.environ) -> Launch:
    """This process's place in the job, from the launcher's environment."""
    if env.get("TORCHELASTIC_RUN_ID") or ("RANK" in env and "WORLD_SIZE" in env):
        return _torchrun(env)
    if (
        "SLURM_PROCID" in env
        and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)
        and env.get("SLURM_STEP_ID", env.get("SLURM_STEPID")) not in ("batch", "4294967294", "extern")
    ):
        return _srun(env)
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env or "PMIX_RANK" in env:
        return _mpirun(env)
    return Launch(
        "single",
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
        master_addr="127.0.0.1",
        master_port=DEFAULT_PORT,
        node=socket.gethostname(),
    )


def start_process_group(launch: Launch, *, backend: str, timeout_minutes: float) -> None:
    """Join the job's default process group, failing after the timeout with the address."""
    launch.export()
    if backend == "nccl":
        # Without it a collective past its timeout is only logged and the rank keeps blocking;
        # with it the watchdog of the NCCL group aborts it and the collective raises. Read when
        # the group starts, so it must be set before init_process_group; a user's value wins.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    where = f"{launch.master_addr}:{launch.master_port}"
    try:
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{where}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
        )
    except Exception as e:  # DistNetworkError, DistStoreError, TimeoutError, RuntimeError
        who = "as the master, waited for the other ranks" if launch.rank == 0 else "could not reach the master"
        raise LaunchError(
            f"rank {launch.rank} of {launch.world_size} ({launch.launcher}, node {launch.node}) {who} "
            f"at {where} within {timeout_minutes:g} min ({type(e).__name__}: {str(e).strip()[:300]}). "
            "Check that the address resolves and the port is open from every node; MASTER_ADDR / "
            "MASTER_PORT override them, parallel.timeout_minutes sets the wait"
        ) from None


def announce_nodes(launch: Launch, *, backend: str, device: str) -> None:
    """One line per node, printed by its first rank: which global ranks it runs."""
    everyone: list = [None] * launch.world_size
    dist.all_gather_object(everyone, (launch.node, launch.rank, launch.local_rank))
    if launch.local_rank != 0:
        return
    mine = sorted(r for node, r, _ in everyone if node == launch.node)
    print(
        f"node {launch.node}: ranks {_ranges(mine)} of {launch.world_size} ({launch.launcher}, {backend}, "
        f"{device}, master {launch.master_addr}:{launch.master_port})",
        flush=True,
    )


def _ranges(ranks: list[int]) -> str:
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ",".join(parts)
