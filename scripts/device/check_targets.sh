#!/usr/bin/env bash
# The GPU check on the card's own kernels and on the portable PTX of each older architecture (the driver compiles
# compute_XY PTX for the card at load, so sm_80/86/89 code paths run for real on a Hopper GPU), from the repository
# root on the GPU machine. Usage: scripts/device/check_targets.sh path/to/qlora-gpu-check [TARGETS]
# Writes check-<target>.txt to $OUT (or /tmp) and prints each run's failures and summary line.
G=$1; TARGETS=${2:-native compute_80 compute_86 compute_89}
for t in $TARGETS; do
  log=${OUT:-/tmp}/check-$t.txt
  start=$(date +%s)
  if [ "$t" = native ]; then $G --no-bench > "$log" 2>&1; else $G --no-bench --arch "$t" > "$log" 2>&1; fi
  echo "### $t ($(( $(date +%s) - start )) s): $(grep -m1 '^device' "$log" | sed 's/.*-> //')"
  grep -v '^PASS' "$log" | grep -v '^device' | tail -12
done
