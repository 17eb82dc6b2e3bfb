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
# SLURM runs a copy of this script from its spool directory, so the checkout is found from
# PRETRAIN_ROOT or the directory sbatch was run in, never from this file's own path.
lib="${PRETRAIN_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib.sh"
if [ ! -f "$lib" ]; then
    echo "error: $lib does not exist: submit from the pretrain checkout (cd /path/to/checkout &&" \
         "sbatch slurm/pretrain_gpt_125m.sh) or set PRETRAIN_ROOT=/path/to/checkout" \
         "(PRETRAIN_ROOT=/path/to/checkout sbatch /path/to/checkout/slurm/pretrain_gpt_125m.sh)" >&2
    exit 2
fi
# shellcheck source=slurm/lib.sh
source "$lib"
pretrain_job configs/gpt_125m.yaml
