#!/usr/bin/env bash
# The per-rank entry the SLURM scripts start: one srun task per GPU (or an mpirun rank, or a
# torchrun worker with `torchrun --no-python launch/train.sh ...`) runs
#     python -m pretrain.train CONFIG key=value ...
# which finds its rank, the world size and the master from the launcher's environment
# (pretrain/launch.py). exec: signals from srun (SIGUSR1 before the time limit, SIGTERM) reach
# Python directly, which saves a checkpoint and exits 75 ("resumable").
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONUNBUFFERED=1
# Threads per rank: the CPUs SLURM gave the task, else 1 (many ranks share a node's cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Triton compiles its kernels in every rank into TRITON_CACHE_DIR, by default ~/.triton/cache: on
# a cluster one shared (network) home directory that every rank of every node writes and locks
# at once. Node-local disk instead, one directory per job ($PPID, the launcher's process on this
# node, shared by its ranks, where SLURM gives no job id); a user's own setting wins.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/pretrain-triton-${USER:-$(id -un)}-${SLURM_JOB_ID:-$PPID}}
exec "${PYTHON:-python3}" -m pretrain.train "$@"
