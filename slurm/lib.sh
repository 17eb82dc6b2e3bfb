# shellcheck shell=bash
# Shared body of the sbatch scripts in this directory (sourced, not run).
#
# pretrain_job DEFAULT_CONFIG: trains with `srun launch/train.sh` on every task of the
# allocation, forwards the batch shell's signals to it, and requeues the job when training
# stopped early with a checkpoint (exit code 75), so the requeued job resumes from `latest`.
# When training fails with a fault (a killed or crashed task, a timed-out collective: exit 1,
# a hang: 76, a signal's 128+N, any other code) it runs srun again in the same allocation, up
# to PRETRAIN_MAX_RESTARTS times per job start; each restart resumes from `latest`. Never
# restarted: 2 (a mistake in the config, data or checkpoint), 77 (diverged) and 78 (checkpoint
# saves failing): the same run would fail again, a person must look. Nor after a signal to the
# batch shell (a stop was asked for). The tasks see PRETRAIN_ATTEMPT (0, then 1, 2, ...).
#
# Environment overrides (the same script runs a 13B model on GPU nodes and a tiny one on CPUs):
#   PRETRAIN_CONFIG     config YAML (default: the script's)
#   PRETRAIN_OVERRIDES  extra space-separated key=value overrides, applied last
#   PRETRAIN_RUN_DIR    checkpoints/ and logs/ go here (default runs/$SLURM_JOB_NAME)
#   PRETRAIN_DATA       data.path (a prefix, or "w1 prefix1 w2 prefix2")
#   PRETRAIN_TOKENIZER  data.tokenizer
#   PYTHON              the Python to run (default python3)
#   PRETRAIN_SRUN_ARGS  extra srun options
#   PRETRAIN_MAX_RESTARTS  in-job restarts after a fault (default 3; 0: none)
#   PRETRAIN_PREFLIGHT  0: skip the memory check before srun (default 1: tools/plan.py on the
#                       job's GPUs; a layout that cannot fit fails the job with exit code 2)
# Nodes and GPUs per node are sbatch's own options: `sbatch --nodes=2 --ntasks-per-node=2
# --gpus-per-node=0 slurm/pretrain_gpt_13b.sh` (or SBATCH_NODES, SBATCH_GPUS_PER_NODE, ...).

# Exit codes of training (pretrain/stopping.py) that are not faults: a restart would end the same
# way, or a person must look first. 0 done, 2 a mistake in the config/data/checkpoint, 75 stopped
# early with a checkpoint (requeued, below), 77 diverged, 78 checkpoint saves failing.
_pretrain_not_a_fault() {
    case $1 in 0 | 2 | 75 | 77 | 78) return 0 ;; *) return 1 ;; esac
}

_pretrain_describe_exit() {
    case $1 in
        1) echo "a crash or a timed-out collective" ;;
        2) echo "a mistake in the config, data or checkpoint" ;;
        76) echo "a hang: the watchdog stopped a rank" ;;
        77) echo "the run diverged" ;;
        78) echo "checkpoint saves failing" ;;
        *) if [ "$1" -gt 128 ]; then
               echo "a task killed by signal $(($1 - 128)) ($(kill -l "$(($1 - 128))" 2>/dev/null || echo '?'))"
           else
               echo "a failed task or srun"
           fi ;;
    esac
}

# Before any task starts: will the layout fit the job's GPUs? tools/plan.py on the job's GPU
# count (one task per GPU) and the memory nvidia-smi reports. A layout that cannot fit ends the
# job with exit code 2 and the planner's breakdown and its fastest layout that fits, instead of
# an out-of-memory error minutes into the run on every node. Without GPUs there is nothing to
# check.
_pretrain_preflight() {
    if [ "${PRETRAIN_PREFLIGHT:-1}" = 0 ]; then
        echo "preflight: skipped (PRETRAIN_PREFLIGHT=0)"
        return 0
    fi
    local gpu
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! gpu=$(nvidia-smi --query-gpu=name,memory.total \
            --format=csv,noheader,nounits 2>/dev/null | head -n 1) || [ -z "$gpu" ]; then
        echo "preflight: no GPU on this node (nvidia-smi), memory check skipped"
        return 0
    fi
    local name=${gpu%,*} memory_mib=${gpu##*, }
    if ! PYTHONPATH="$PRETRAIN_ROOT${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -c \
            'import sys; from pretrain.hardware import hardware_of_gpu; sys.exit(hardware_of_gpu(sys.argv[1], 80) is None)' \
            "$name" 2>/dev/null; then
        echo "preflight: no profile for ${name} in pretrain/hardware.py, memory check skipped"
        return 0
    fi
    local rc=0
    echo "preflight: ${SLURM_NTASKS} x ${name} (${memory_mib} MiB)"
    "${PYTHON:-python3}" "$PRETRAIN_ROOT/tools/plan.py" "$@" --gpus "${SLURM_NTASKS}" --hardware "$name" \
        --memory-gib "$((memory_mib / 1024))" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "error: preflight: the layout does not fit ${SLURM_NTASKS} x ${name} (or cannot run there)," \
             "see above; not starting training (PRETRAIN_PREFLIGHT=0 skips this check)" >&2
        exit 2
    fi
}

# A signal to the batch shell goes to the current srun; afterwards the job does not restart (a
# stop was asked for: exit 75 requeues, anything else ends the job).
_pretrain_forward() {
    _pretrain_stop_signal=$1
    echo "batch shell: SIG$1, passing it to the training tasks"
    if [ -n "${_pretrain_srun_pid:-}" ]; then kill "-$1" "$_pretrain_srun_pid" 2>/dev/null || true; fi
}

# srun returns once every task of its step has ended; should the controller still list a step of
# this job (a task it could not reap yet), kill it and wait, so that a relaunch never meets ranks
# of the failed attempt (blocked in a collective, holding the checkpoint directory's lock).
_pretrain_end_leftover_steps() {
    local steps="" waited
    for waited in $(seq 0 60); do
        steps=$(squeue -h -s -j "$SLURM_JOB_ID" -o %i 2>/dev/null | grep -E '\.[0-9]+$' || true)
        [ -z "$steps" ] && return 0
        if [ "$waited" -eq 5 ]; then
            echo "job ${SLURM_JOB_ID}: steps of the failed attempt still running ($(echo "$steps" | tr '\n' ' ')): killing them"
            # shellcheck disable=SC2086  # one step id per word
            scancel --signal=KILL $steps 2>/dev/null || true
        fi
        sleep 1
    done
    echo "job ${SLURM_JOB_ID}: steps $(echo "$steps" | tr '\n' ' ')still listed after 60 s; relaunching anyway" >&2
}

pretrain_job() {
    local default_config=$1
    local config=${PRETRAIN_CONFIG:-$default_config}
    local run_dir=${PRETRAIN_RUN_DIR:-$PRETRAIN_ROOT/runs/${SLURM_JOB_NAME:-pretrain}}
    local max_restarts=${PRETRAIN_MAX_RESTARTS:-3}
    if ! [[ $max_restarts =~ ^[0-9]+$ ]]; then
        echo "error: PRETRAIN_MAX_RESTARTS must be a whole number >= 0, got '$max_restarts'" >&2
        exit 2
    fi
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
    _pretrain_preflight "${args[@]}"

    # In the background so that this shell can take signals: bash runs a trap only between
    # commands, and a foreground srun would hold it until training ends. srun relays SIGUSR1
    # and SIGTERM to every task.
    # --wait: once one task has ended, the others get 2 minutes before srun kills them. Not
    # --kill-on-bad-exit: when training stops early every task exits 75 within a second or two,
    # and killing the slower ones would turn the step's exit code from 75 into "Terminated".
    # After a fault the surviving ranks end on their own (a collective with a dead peer fails, or
    # times out after parallel.timeout_minutes; the watchdog exits 76 after
    # train.hang_timeout_minutes) or are killed by srun 2 minutes after the first task ended: the
    # step is over before a restart begins.
    local srun_args=()
    read -r -a srun_args <<< "${PRETRAIN_SRUN_ARGS:-}"
    # The launcher derives the rendezvous port from the job id (pretrain/launch.py); a restart
    # takes another one, so that it cannot meet sockets the failed attempt left behind. A
    # stride far from 1 keeps it off the ports of the jobs submitted right after this one.
    local user_port=${MASTER_PORT:-}
    _pretrain_stop_signal=""
    _pretrain_srun_pid=""
    trap '_pretrain_forward USR1' USR1
    trap '_pretrain_forward TERM' TERM
    local attempt=0 rc=0
    while true; do
        export PRETRAIN_ATTEMPT=$attempt  # 0, then 1 .. PRETRAIN_MAX_RESTARTS (tasks see it)
        if [ "$attempt" -gt 0 ]; then
            if [ -n "$user_port" ]; then
                export MASTER_PORT=$((user_port + attempt))
            else
                export MASTER_PORT=$((20000 + (SLURM_JOB_ID + 7919 * attempt) % 20000))
            fi
        fi
        srun --wait=120 --label "${srun_args[@]}" "$PRETRAIN_ROOT/launch/train.sh" "${args[@]}" &
        _pretrain_srun_pid=$!
        # A signal that came in the instant between the check above and this srun: pass it on.
        if [ -n "$_pretrain_stop_signal" ]; then kill "-$_pretrain_stop_signal" "$_pretrain_srun_pid" 2>/dev/null || true; fi
        while kill -0 "$_pretrain_srun_pid" 2>/dev/null; do
            wait "$_pretrain_srun_pid" && rc=0 || rc=$?  # returns early (> 128) when a trapped signal arrives
        done
        wait "$_pretrain_srun_pid" && rc=0 || rc=$?  # srun's own exit status
        _pretrain_srun_pid=""

        if _pretrain_not_a_fault "$rc"; then
            break
        fi
        if [ "$attempt" -ge "$max_restarts" ]; then
            echo "job ${SLURM_JOB_ID}: training failed with exit code $rc ($(_pretrain_describe_exit "$rc")) and" \
                 "all $max_restarts restarts (PRETRAIN_MAX_RESTARTS) are used up: giving up; resubmit to resume" \
                 "from $run_dir/checkpoints" >&2
            break
        fi
        if [ -z "$_pretrain_stop_signal" ]; then _pretrain_end_leftover_steps; fi
        if [ -n "$_pretrain_stop_signal" ]; then  # during this attempt or while its steps ended
            echo "job ${SLURM_JOB_ID}: training ended with exit code $rc ($(_pretrain_describe_exit "$rc")) after" \
                 "SIG$_pretrain_stop_signal: not restarting"
            break
        fi
        attempt=$((attempt + 1))
        echo "job ${SLURM_JOB_ID}: restart $attempt of $max_restarts in the same allocation after exit code $rc" \
             "($(_pretrain_describe_exit "$rc")), resuming from the latest checkpoint in $run_dir/checkpoints"
    done
    trap - USR1 TERM

    case $rc in
        2 | 77 | 78)
            echo "job ${SLURM_JOB_ID}: training failed with exit code $rc ($(_pretrain_describe_exit "$rc")):" \
                 "not restarting, a person must look" >&2 ;;
    esac
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
