#!/bin/bash
#SBATCH --job-name=gpt_1.3b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# GPT-3 XL shape (configs/gpt_1.3b.yaml) on 2 nodes x 8 GPUs: data parallel 16 with ZeRO-1
# (1.3B parameters fit one GPU: 2.6 GB bf16 weights + 2.6 GB gradients + 12 B x 1.3B / 16 =
# 1 GB of sharded optimizer state). Overrides and requeueing as in pretrain_gpt_13b.sh.
set -euo pipefail
# SLURM runs a copy of this script from its spool directory, so the checkout is found from
# PRETRAIN_ROOT or the directory sbatch was run in, never from this file's own path.
lib="${PRETRAIN_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib.sh"
if [ ! -f "$lib" ]; then
    echo "error: $lib does not exist: submit from the pretrain checkout (cd /path/to/checkout &&" \
         "sbatch slurm/pretrain_gpt_1.3b.sh) or set PRETRAIN_ROOT=/path/to/checkout" \
         "(PRETRAIN_ROOT=/path/to/checkout sbatch /path/to/checkout/slurm/pretrain_gpt_1.3b.sh)" >&2
    exit 2
fi
# shellcheck source=slurm/lib.sh
source "$lib"
PRETRAIN_OVERRIDES="parallel.zero_stage=1 ${PRETRAIN_OVERRIDES:-}" pretrain_job configs/gpt_1.3b.yaml
