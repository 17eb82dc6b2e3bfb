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
# shellcheck source=slurm/lib.sh
source "${PRETRAIN_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib.sh"
PRETRAIN_OVERRIDES="parallel.zero_stage=1 ${PRETRAIN_OVERRIDES:-}" pretrain_job configs/gpt_1.3b.yaml
