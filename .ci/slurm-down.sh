#!/usr/bin/env bash
# Stop the SLURM started by .ci/slurm-up.sh and remove its config (a leftover slurm.conf with no
# slurmctld makes every later snakemake start wait 10 s for `scontrol`).
RUN=${SLURM_RUN_DIR:-/tmp/tessera-slurm}
scancel --user="$(id -un)" 2>/dev/null || true
pids=""
for f in "$RUN"/slurmd.pid "$RUN"/slurmctld.pid /run/munge/munged.pid; do
  [ -f "$f" ] && pids="$pids $(cat "$f")"
done
for p in $pids; do kill "$p" 2>/dev/null || true; done
for _ in $(seq 1 100); do
  alive=0
  for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && break
  sleep 0.1
done
rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf
rm -rf "$RUN"
exit 0
