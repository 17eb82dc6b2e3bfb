#!/bin/bash
#SBATCH --job-name=preprocess
#SBATCH --array=0-15
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=06:00:00
#SBATCH --output=slurm-%x-%A_%a.out
#
# Tokenize a corpus split into shards (JSONL, .gz or .zst), one CPU task per array index:
# task i of N takes shards i, i+N, i+2N, ... and writes OUTPUT_DIR/<shard>_text_document.bin/.idx
# with tools/preprocess_data.py on all the task's CPUs. Merge the results afterwards, e.g. in a
# dependent job (`sbatch --dependency=afterok:JOBID ...`), with tools/merge_datasets.py, or
# blend them directly in data.path ("w1 prefix1 w2 prefix2 ...").
#
#   PRETRAIN_INPUTS=/data/shards/*.jsonl.zst PRETRAIN_OUTPUT_DIR=/data/tokens \
#   PRETRAIN_TOKENIZER=/data/tokenizer.model sbatch --array=0-31 slurm/preprocess_data.sh
#
# Environment: PRETRAIN_INPUTS (glob(s), quoted), PRETRAIN_OUTPUT_DIR, PRETRAIN_TOKENIZER,
# PRETRAIN_JSON_KEYS (default text), PRETRAIN_PREPROCESS_ARGS (more tools/preprocess_data.py
# flags), PYTHON, PRETRAIN_ROOT (default: the submit directory).
set -euo pipefail
# SLURM runs a copy of this script from its spool directory: the checkout is PRETRAIN_ROOT or
# the directory sbatch was run in, never this file's own path.
ROOT=${PRETRAIN_ROOT:-${SLURM_SUBMIT_DIR:-.}}
if [ ! -f "$ROOT/tools/preprocess_data.py" ]; then
    echo "error: $ROOT/tools/preprocess_data.py does not exist: submit from the pretrain checkout" \
         "(cd /path/to/checkout && sbatch slurm/preprocess_data.sh) or set PRETRAIN_ROOT=/path/to/checkout" >&2
    exit 2
fi
: "${PRETRAIN_INPUTS:?set PRETRAIN_INPUTS to the input shards, e.g. '/data/shards/*.jsonl'}"
: "${PRETRAIN_OUTPUT_DIR:?set PRETRAIN_OUTPUT_DIR}"
: "${PRETRAIN_TOKENIZER:?set PRETRAIN_TOKENIZER to a sentencepiece .model or tokenizer.json}"
task=${SLURM_ARRAY_TASK_ID:-0}
tasks=${SLURM_ARRAY_TASK_COUNT:-1}
# shellcheck disable=SC2206  # the globs are meant to expand here
shards=($PRETRAIN_INPUTS)
mapfile -t shards < <(printf '%s\n' "${shards[@]}" | sort)
if [ ! -e "${shards[0]}" ]; then
    echo "error: PRETRAIN_INPUTS=$PRETRAIN_INPUTS matches no file" >&2
    exit 2
fi
mkdir -p "$PRETRAIN_OUTPUT_DIR"
extra=()
read -r -a extra <<< "${PRETRAIN_PREPROCESS_ARGS:-}"
for ((i = task; i < ${#shards[@]}; i += tasks)); do
    shard=${shards[$i]}
    name=$(basename "$shard")
    name=${name%.gz}; name=${name%.zst}; name=${name%.jsonl}; name=${name%.json}
    echo "task $task of $tasks: shard $((i + 1)) of ${#shards[@]}: $shard -> $PRETRAIN_OUTPUT_DIR/$name"
    "${PYTHON:-python3}" "$ROOT/tools/preprocess_data.py" --input "$shard" \
        --output-prefix "$PRETRAIN_OUTPUT_DIR/$name" --tokenizer "$PRETRAIN_TOKENIZER" \
        --json-keys "${PRETRAIN_JSON_KEYS:-text}" --append-eod --workers "${SLURM_CPUS_PER_TASK:-1}" "${extra[@]}"
done
