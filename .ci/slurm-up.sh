#!/usr/bin/env bash
# Start a single-node SLURM on this machine (Debian packages, no systemd) with a CPU partition
# `cpu` and a GPU partition `gpu` backed by a fake GPU GRES, for the SLURM tests. Job records go to
# SLURM's own completion log ($SLURM_RUN_DIR/jobcomp.log). Stop with .ci/slurm-down.sh.
set -euo pipefail
RUN=${SLURM_RUN_DIR:-/tmp/tessera-slurm}
pkgs="slurmctld slurmd slurm-client munge"
missing=0
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing=1; done
if [ "$missing" = 1 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
mkdir -p "$RUN"/state "$RUN"/spool "$RUN"/log /etc/slurm
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null
host=$(hostname -s)
hardware=$(slurmd -C | head -1)
topology=$(echo "$hardware" | grep -o 'CPUs=.*ThreadsPerCore=[0-9]*')
memory=$(( $(echo "$hardware" | sed 's/.*RealMemory=\([0-9]*\).*/\1/') * 8 / 10 ))
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=tessera-ci
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$RUN/state
SlurmdSpoolDir=$RUN/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$RUN/log/slurmctld.log
SlurmdLogFile=$RUN/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$RUN/jobcomp.log
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 $topology RealMemory=$memory Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
CONF
echo "NodeName=$host Name=gpu File=/dev/null" > /etc/slurm/gres.conf
/usr/sbin/slurmctld
/usr/sbin/slurmd
for _ in $(seq 1 150); do
  sinfo -h -o '%t' 2>/dev/null | grep -qx idle && break
  sleep 0.2
done
if ! sinfo -h -o '%t' | grep -qx idle; then
  tail -20 "$RUN"/log/*.log >&2
  exit 1
fi
echo "SLURM up: partitions $(sinfo -h -o '%P' | tr '\n' ' ')(job records: $RUN/jobcomp.log)"
