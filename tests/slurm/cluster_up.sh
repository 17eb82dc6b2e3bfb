#!/usr/bin/env bash
# Start a real SLURM cluster on this one machine for the tests: slurmctld plus two slurmd
# daemons posing as nodes n1 and n2 (Debian's slurmd is built with MULTIPLE_SLURMD), munge for
# authentication. Installs Debian's packages when missing (apt-get; root or sudo).
#
#   bash tests/slurm/cluster_up.sh          # prints the SLURM_CONF to export
#   source "$PRETRAIN_SLURM_DIR/env.sh"     # (default /tmp/pretrain-slurm) then sbatch, srun, sinfo
#   bash tests/slurm/cluster_down.sh        # stops only what this script started
#
# Idempotent: when the cluster it describes already answers with idle nodes, it does nothing.
set -euo pipefail

DIR=${PRETRAIN_SLURM_DIR:-/tmp/pretrain-slurm}
NODES=${PRETRAIN_SLURM_NODES:-2}
CPUS=$(nproc)
SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
log() { echo "[cluster_up $(date +%T)] $*"; }

export SLURM_CONF=$DIR/slurm.conf
if [ -f "$DIR/started" ] && [ "$(sinfo -h -o '%T' 2>/dev/null | sort -u | tr -d '\n')" = idle ]; then
    log "already up ($SLURM_CONF)"
    exit 0
fi

missing=()
for tool in slurmctld slurmd sbatch munged; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$DIR/state" "$DIR/log" "$DIR/pid"
# Memory per fake node: a share of the real memory, below what each slurmd detects (a node
# configured with more memory than it has is drained).
MEM=$(( $(awk '/^MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 8 / 10 / NODES ))
NAMES=()
for i in $(seq 1 "$NODES"); do NAMES+=("n$i"); done

{
    echo "# Written by tests/slurm/cluster_up.sh: $NODES fake nodes on $(hostname)"
    echo "ClusterName=pretrain-ci"
    echo "SlurmctldHost=localhost"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    # A requeued job may start again only after cred_expire seconds (default 120).
    echo "AuthInfo=cred_expire=10"
    # No cgroups in a container: track processes by parent, no task binding.
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "MpiDefault=none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "SchedulerType=sched/backfill"
    echo "SchedulerParameters=sched_interval=2"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    echo "ReturnToService=2"
    echo "MailProg=/bin/true"
    # Finished jobs stay visible to `scontrol show job` for 5 minutes (tests read their state).
    echo "MinJobAge=300"
    echo "KillWait=10"
    echo "InactiveLimit=0"
    echo "Waittime=0"
    echo "SlurmctldPort=6817"
    echo "SlurmdPort=6818"
    echo "StateSaveLocation=$DIR/state/ctld"
    echo "SlurmdSpoolDir=$DIR/state/%n"
    echo "SlurmctldPidFile=$DIR/pid/slurmctld.pid"
    echo "SlurmdPidFile=$DIR/pid/slurmd-%n.pid"
    echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
    for i in $(seq 1 "$NODES"); do
        # Every fake node is this machine: same address, its own slurmd port.
        echo "NodeName=n$i NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$((17100 + i)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
    done
    echo "PartitionName=ci Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
} > "$SLURM_CONF"
echo "export SLURM_CONF=$SLURM_CONF" > "$DIR/env.sh"

# munge: reuse a running daemon, else start one as the munge user with a key.
if ! (munge -n | unmunge) >/dev/null 2>&1; then
    $SUDO mkdir -p /run/munge /var/log/munge
    $SUDO chown munge:munge /run/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        $SUDO mungekey --create --force
        $SUDO chown munge:munge /etc/munge/munge.key
        $SUDO chmod 400 /etc/munge/munge.key
    fi
    $SUDO runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 1 50); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.1; done
    cp /run/munge/munged.pid "$DIR/pid/munged.pid"
fi

$SUDO env SLURM_CONF="$SLURM_CONF" /usr/sbin/slurmctld -i
for _ in $(seq 1 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
for name in "${NAMES[@]}"; do
    $SUDO env SLURM_CONF="$SLURM_CONF" /usr/sbin/slurmd -N "$name"
done
touch "$DIR/started"

state=""
for _ in $(seq 1 150); do
    state=$(sinfo -h -o '%T' | sort -u | tr -d '\n')
    [ "$state" = idle ] && break
    sleep 0.2
done
if [ "$state" != idle ]; then
    log "nodes are '$state', not idle; logs:"
    tail -n 20 "$DIR"/log/*.log >&2
    exit 1
fi
sinfo -N
log "up: export SLURM_CONF=$SLURM_CONF  (or: source $DIR/env.sh)"
