#!/bin/bash
# A one-node Slurm cluster on this machine, for tests: munged, slurmctld and slurmd (Debian's
# slurm-wlm and munge), all state, sockets, logs and pid files under DIR, non-default ports.
#
#   tests/slurm/start_cluster.sh DIR   # prints `export SLURM_CONF=DIR/slurm.conf` when the node is idle
#   tests/slurm/stop_cluster.sh DIR
#
# Needs root (slurmd runs jobs as their submitting user) and:
#   apt-get install -y --no-install-recommends slurm-wlm munge
# No cgroups: proctrack/linuxproc, task/none. One node "localhost" with the machine's CPUs.
set -euo pipefail

DIR=${1:?usage: start_cluster.sh DIR}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CPUS=${RLVRX_SLURM_CPUS:-$(nproc)}
MEM_MB=${RLVRX_SLURM_MEM_MB:-2048}
CTLD_PORT=${RLVRX_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${RLVRX_SLURM_SLURMD_PORT:-16818}
HOST=$(hostname -s)

for tool in munged slurmctld slurmd sbatch scontrol; do
    command -v "$tool" >/dev/null || { echo "start_cluster: $tool not found (apt-get install slurm-wlm munge)" >&2; exit 3; }
done
[ "$(id -u)" -eq 0 ] || { echo "start_cluster: needs root" >&2; exit 3; }

mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
chmod 700 "$DIR/munge"

# munge: a private key and socket, so nothing outside DIR is touched.
if [ ! -f "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
fi
munged --force --socket="$DIR/munge/munge.sock" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"

cat > "$DIR/slurm.conf" <<EOF
ClusterName=rlvrxtest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.sock
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MinJobAge=300
NodeName=localhost NodeHostname=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$DIR/slurm.conf"

slurmctld -f "$SLURM_CONF" -i
slurmd -f "$SLURM_CONF" -N localhost

for _ in $(seq 60); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
    case "$state" in
        idle*) echo "export SLURM_CONF=$SLURM_CONF"; exit 0 ;;
    esac
    sleep 1
done
echo "start_cluster: node not idle after 60 s (state: ${state:-none}); logs in $DIR" >&2
tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
exit 1
