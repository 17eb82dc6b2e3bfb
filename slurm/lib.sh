# shellcheck shell=bash
# Shared body of the sbatch scripts in this directory (sourced, not run).
#
# pretrain_job DEFAULT_CONFIG: trains with `srun launch/train.sh` on every task of the
# allocation, forwards the batch shell's signals to it, and requeues the job when training
# stopped early with a checkpoint (exit code 75), so the requeued job resumes from `latest`.
#
# Environment overrides (the same script runs a 13B model on GPU nodes and a tiny one on CPUs):
#   PRETRAIN_CONFIG     config YAML (default: the script's)
#   PRETRAIN_OVERRIDES  extra space-separated key=value overrides, applied last
#   PRETRAIN_RUN_DIR    checkpoints/ and logs/ go here (default runs/$SLURM_JOB_NAME)
#   PRETRAIN_DATA       data.path (a prefix, or "w1 prefix1 w2 prefix2")
#   PRETRAIN_TOKENIZER  data.tokenizer
#   PYTHON              the Python to run (default python3)
#   PRETRAIN_SRUN_ARGS  extra srun options
# Nodes and GPUs per node are sbatch's own options: `sbatch --nodes=2 --ntasks-per-node=2
# --gpus-per-node=0 slurm/pretrain_gpt_13b.sh` (or SBATCH_NODES, SBATCH_GPUS_PER_NODE, ...).

pretrain_job() {
    local default_config=$1
    local config=${PRETRAIN_CONFIG:-$default_config}
    local run_dir=${PRETRAIN_RUN_DIR:-$PRETRAIN_ROOT/runs/${SLURM_JOB_NAME:-pretrain}}
    mkdir -p "$run_dir/logs"
    local args=("$config" "checkpoint.dir=$run_dir/checkpoints" "logging.dir=$run_dir/logs")
    [ -n "${PRETRAIN_DATA:-}" ] && args+=("data.path=$PRETRAIN_DATA")
    [ -n "${PRETRAIN_TOKENIZER:-}" ] && args+=("data.tokenizer=$PRETRAIN_TOKENIZER")
    local extra=()
    read -r -a extra <<< "${PRETRAIN_OVERRIDES:-}"
    args+=("${extra[@]}")

    echo "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}), start $((${SLURM_RESTART_COUNT:-0} + 1)): ${SLURM_JOB_NUM_NODES} nodes" \
         "(${SLURM_JOB_NODELIST}), ${SLURM_NTASKS} tasks; run dir $run_dir"
    echo "train: ${args[*]}"

    # In the background so that this shell can take signals: bash runs a trap only between
    # commands, and a foreground srun would hold it until training ends. srun relays SIGUSR1
    # and SIGTERM to every task.
    # --wait: once one task has ended, the others get 2 minutes before srun kills them. Not
    # --kill-on-bad-exit: when training stops early every task exits 75 within a second or two,
    # and killing the slower ones would turn the step's exit code from 75 into "Terminated".
    local srun_args=()
    read -r -a srun_args <<< "${PRETRAIN_SRUN_ARGS:-}"
    srun --wait=120 --label "${srun_args[@]}" "$PRETRAIN_ROOT/launch/train.sh" "${args[@]}" &
    local srun_pid=$!
    # shellcheck disable=SC2064  # the pid is fixed now
    trap "echo 'batch shell: SIGUSR1, passing it to the training tasks'; kill -USR1 $srun_pid" USR1
    # shellcheck disable=SC2064
    trap "echo 'batch shell: SIGTERM, passing it to the training tasks'; kill -TERM $srun_pid" TERM
    local rc=0
    while kill -0 "$srun_pid" 2>/dev/null; do
        wait "$srun_pid" && rc=0 || rc=$?  # returns early (> 128) when a trapped signal arrives
    done
    wait "$srun_pid" && rc=0 || rc=$?  # srun's own exit status
    trap - USR1 TERM

    if [ "$rc" -eq 75 ]; then
        echo "training stopped early with a checkpoint: requeueing job ${SLURM_JOB_ID}"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        echo "scontrol requeue failed; resubmit this script to resume from $run_dir/checkpoints" >&2
    fi
    exit "$rc"
}

if [ -z "${PRETRAIN_ROOT:-}" ]; then
    PRETRAIN_ROOT=${SLURM_SUBMIT_DIR:-$PWD}
fi
if [ ! -x "$PRETRAIN_ROOT/launch/train.sh" ]; then
    echo "error: $PRETRAIN_ROOT is not a pretrain checkout (no launch/train.sh); submit from the checkout" \
         "or set PRETRAIN_ROOT" >&2
    exit 2
fi
export PRETRAIN_ROOT
