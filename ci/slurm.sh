#!/usr/bin/env bash
# twinkle_dask on workers that a real Slurm started through dask-jobqueue, on this one machine:
# Debian's slurmctld, slurmd and munge with a generated one-node slurm.conf, the daemons run in
# the background as root (no systemd), then ci/slurm_driver.py: the main job (the training of
# ci/train.sh) and a lazy hand-off between two groups on SLURMCluster workers, a worker job
# cancelled with scancel mid-call, and its replacement job. Everything it started is killed by
# PID at the end. Needs root and apt (Debian/Ubuntu); prints a SKIP line and exits 0 otherwise.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
state="${TWINKLE_SLURM_DIR:-/tmp/twinkle-slurm}"
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }

if [ "$(id -u)" != 0 ]; then
    echo "SKIP ci/slurm.sh: running slurmctld, slurmd and munged needs root"
    exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        echo "SKIP ci/slurm.sh: Slurm is not installed and there is no apt-get to install it"
        exit 0
    fi
    install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null; }
    if ! { install || { apt-get update -q >/dev/null && install; }; }; then
        echo "SKIP ci/slurm.sh: apt-get could not install slurmctld slurmd slurm-client munge"
        exit 0
    fi
fi

# shellcheck disable=SC1091
source "$root/ci/env.sh"
python -c "import dask_jobqueue" 2>/dev/null || python -m pip install --quiet -e "$root[slurm]"

pids=()
teardown() {
    # our jobs first (scancel needs slurmctld), then the daemons, by PID
    if [ -f "$state/slurm.conf" ] && [ ${#pids[@]} -gt 0 ]; then
        SLURM_CONF="$state/slurm.conf" timeout 10 scancel --full --quiet --user root 2>/dev/null || true
    fi
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
}
# what an interrupted earlier run left: its daemons, by the PIDs it recorded
for f in "$state"/*.pid; do
    [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true
done
rm -rf "$state"
mkdir -p "$state/ctld" "$state/spool" "$state/jobs"
chmod 700 "$state"
trap teardown EXIT

started=$EPOCHREALTIME
# munge: a fresh key and its own socket
dd if=/dev/urandom of="$state/munge.key" bs=1024 count=1 status=none
chmod 400 "$state/munge.key"
munged -F --force --key-file "$state/munge.key" --socket "$state/munge.sock" --pid-file "$state/munged.pid" \
    --log-file "$state/munged.log" --seed-file "$state/munged.seed" >"$state/munged.out" 2>&1 &
pids+=($!)

node="$(hostname -s)"
cat > "$state/slurm.conf" <<CONF
ClusterName=twinkle
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/munge.sock
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
# one node; more CPUs than the machine has, so that every worker job (1 CPU each) runs at once
NodeName=$node NodeAddr=127.0.0.1 CPUs=16 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$state/slurm.conf"
for _ in $(seq 100); do [ -S "$state/munge.sock" ] && break; sleep 0.05; done
slurmctld -D -i -f "$SLURM_CONF" >"$state/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -f "$SLURM_CONF" >"$state/slurmd.out" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
    sinfo -h -N -o '%T' 2>/dev/null | grep -qx 'idle' && break
    sleep 0.1
done
sinfo -h -N -o '%T' | grep -qx 'idle' || { echo "slurmd did not come up:"; sinfo; tail -20 "$state"/*.log; exit 1; }
echo "[slurm] munged, slurmctld and slurmd up: $(elapsed "$started") s"
sinfo

cd "$state/jobs"  # the jobs' output files
timeout 300 python "$root/ci/slurm_driver.py"
echo "[slurm] all checks passed in $(elapsed "$started") s"
