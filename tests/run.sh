#!/usr/bin/env bash
# Install what the tests need and run the whole suite; the README's test command, and what
# .ci/run calls on a fresh clone.
# - Debian packages (root or sudo): g++ (DeepSpeed compiles one small op at its first start),
#   Open MPI (mpirun tests), shellcheck (script lint), SLURM + munge (a real 2-node cluster).
# - pip: pretrain with its test and kernels extras (triton, ~300 MB: its kernels are checked on
#   CPU under TRITON_INTERPRET=1), CPU torch pinned by constraints.txt; DeepSpeed without
#   prebuilt C++ ops (DS_BUILD_OPS=0).
# - ruff (lint + format check, ruff.toml) before any test.
# - tests/slurm/cluster_up.sh starts the SLURM cluster the sbatch tests submit to; it is
#   stopped again when the suite ends.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
cd "$ROOT"

need=()
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin libopenmpi-dev)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
for tool in slurmctld slurmd sbatch munged; do
    command -v "$tool" >/dev/null 2>&1 || { need+=(slurmctld slurmd slurm-client munge); break; }
done
if [ ${#need[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "tests/run.sh: missing ${need[*]} and apt-get is not available to install them" >&2
        exit 1
    fi
    SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
    echo "tests/run.sh: installing ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

DS_BUILD_OPS=0 "$PY" -m pip install -q -c constraints.txt -e ".[test,kernels]"
# torch finds ninja on PATH; pip puts it beside this Python, which may not be on PATH yet.
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

# Lint and format first (ruff.toml): seconds, and a failure names file and line.
"$PY" -m ruff check .
"$PY" -m ruff format --check .

started_cluster=0
if [ ! -f "${PRETRAIN_SLURM_DIR:-/tmp/pretrain-slurm}/started" ]; then started_cluster=1; fi
bash tests/slurm/cluster_up.sh
if [ "$started_cluster" = 1 ]; then trap 'bash tests/slurm/cluster_down.sh' EXIT; fi
"$PY" -m pytest -q --durations=25 tests "$@"
