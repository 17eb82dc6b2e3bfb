#!/bin/bash
#SBATCH --job-name=gpt_125m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# GPT-3 Small shape (configs/gpt_125m.yaml) on one node: data parallel 8, no sharding needed.
# Overrides and requeueing as in pretrain_gpt_13b.sh.
set -euo pipefail
# shellcheck source=slurm/lib.sh
source "${PRETRAIN_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib.sh"
pretrain_job configs/gpt_125m.yaml
