#!/usr/bin/env bash
# Stop the daemons tests/slurm/cluster_up.sh started (by their pid files), nothing else.
set -uo pipefail
DIR=${PRETRAIN_SLURM_DIR:-/tmp/pretrain-slurm}
SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
stopped=()
for file in "$DIR"/pid/slurmd-*.pid "$DIR"/pid/slurmctld.pid "$DIR"/pid/munged.pid; do
    [ -s "$file" ] || continue
    pid=$(cat "$file")
    if $SUDO kill "$pid" 2>/dev/null; then stopped+=("$pid"); fi
    rm -f "$file"
done
for _ in $(seq 1 50); do
    alive=0
    for pid in "${stopped[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
done
rm -f "$DIR/started"
echo "[cluster_down] stopped ${#stopped[@]} daemons: ${stopped[*]}"
