#!/bin/bash
#SBATCH --job-name=gpt_13b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# GPT-3 13B (40 layers, hidden 5120, 40 heads, sequence 2048, GPT-2 vocabulary) on 16 nodes x
# 8 GPUs, one task per GPU: `sbatch slurm/pretrain_gpt_13b.sh` from the pretrain checkout, with
# PRETRAIN_DATA / PRETRAIN_TOKENIZER pointing at the preprocessed corpus (slurm/lib.sh lists
# every environment override). Ten minutes before the time limit SLURM sends SIGUSR1 to this
# shell, which passes it on: training saves a checkpoint, exits 75, and the job requeues itself
# and resumes from `latest`.
#
# Layout (configs/gpt_13b.yaml): tensor 4 x pipeline 1 x data 32 = 128 GPUs, bf16, ZeRO-1,
# sequence parallelism, selective activation checkpointing. Why:
# - TP 4 keeps every tensor-parallel all-reduce inside a node's NVLink (8 GPUs per node; TP 8
#   would halve each matmul again for little memory gain), and 40 heads split 10 per rank.
# - No pipeline: at TP 4 the model already fits (below), and PP would only add a bubble.
# - ZeRO-1 shards fp32 master weights + Adam moments over the 32 data-parallel ranks.
# Memory per GPU and speed, as `python tools/plan.py configs/gpt_13b.yaml --gpus 128 --hardware h100`
# prints them (slurm/lib.sh runs the same check on the job's real GPUs before srun, README "Will it fit?"):
#   layout: tensor 4 x pipeline 1 x data 32, ZeRO-1, sequence parallel, recompute selective, micro-batch 1 x 32 per step, bf16
#   hardware: NVIDIA H100 SXM 80GB
#   per-GPU memory (GiB)     pp rank 0
#     weights                     6.00
#     gradients                   6.00
#     optimizer state             1.13
#     activations                 4.71   (saved for backward by the micro-batches in flight, logits included)
#     optimizer step              0.38   (ZeRO's fp32 gradient partition, while no activations are held)
#     comm buffers                0.05   (ZeRO's reduce/gather buckets (parallel.bucket_mb each))
#     overhead                    2.89   (estimate: CUDA context, NCCL buffers, 5% allocator slack)
#     total                      20.78
#     parameters                 3.22B
#     in flight                      1
#   peak 20.8 GiB of 80 GiB per GPU: fits
#   step 3.78 s (compute 3.08, bubble 0.00, tensor-parallel 0.45, pipeline sends 0.00, data-parallel exposed 0.25, optimizer 0.00):
#     4,336 tokens/s per GPU, MFU 36.0%
# On 40 GB GPUs it still fits; for longer sequences add PRETRAIN_OVERRIDES="parallel.pipeline=2"
# (halves weights and gradients per GPU; 16 micro-batches per rank keep the 1F1B bubble at 6%).
# Global batch 1024 sequences (2M tokens, GPT-3's for 13B): 32 micro-batches per rank per step.
set -euo pipefail
# SLURM runs a copy of this script from its spool directory, so the checkout is found from
# PRETRAIN_ROOT or the directory sbatch was run in, never from this file's own path.
lib="${PRETRAIN_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/lib.sh"
if [ ! -f "$lib" ]; then
    echo "error: $lib does not exist: submit from the pretrain checkout (cd /path/to/checkout &&" \
         "sbatch slurm/pretrain_gpt_13b.sh) or set PRETRAIN_ROOT=/path/to/checkout" \
         "(PRETRAIN_ROOT=/path/to/checkout sbatch /path/to/checkout/slurm/pretrain_gpt_13b.sh)" >&2
    exit 2
fi
# shellcheck source=slurm/lib.sh
source "$lib"
pretrain_job configs/gpt_13b.yaml
