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
# Memory per GPU (12.85B parameters; 3.21B per TP rank):
#   bf16 weights 2 B x 3.21B                                  =  6.4 GB
#   bf16 gradients 2 B x 3.21B                                =  6.4 GB
#   fp32 master + Adam m, v: 12 B x 3.21B / 32 (ZeRO-1)       =  1.2 GB
#   activations, selective recompute + sequence parallel, measured (bench/activation_memory.py):
#     44 s b h / TP bytes per layer = 44 x 2048 x 1 x 5120 / 4 = 115 MB x 40 layers = 4.6 GB
#     (28 + 4 TP: the QKV and fc1 inputs are saved all-gathered, 2 s b h bytes each, not the
#     2 s b h / TP Megatron's 34 assumes; micro-batch 1, and without a pipeline one micro-batch
#     is in flight)
#   output layer: fp32 logits s x V/TP = 2048 x 12672 x 4 B   =  0.1 GB
#   communication buckets, CUDA context, allocator slack      ~  3 GB
#   total                                                     ~ 22 GB of 80 (A100/H100-80GB)
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
