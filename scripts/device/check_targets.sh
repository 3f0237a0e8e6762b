#!/usr/bin/env bash
# The GPU check on the card's own kernels and on the portable PTX of each older architecture (the driver compiles
# compute_XY PTX for the card at load, so sm_75/80/86/89 code paths run for real on a Hopper GPU), from the repository
# root on the GPU machine, each target optionally with a compute type (TARGET:fp16 or TARGET:bf16; compute_75 is fp16
# by itself). Usage: scripts/device/check_targets.sh path/to/qlora-gpu-check [TARGETS]
# Writes check-<target>.txt to $OUT (or /tmp) and prints each run's failures and summary line.
G=$1; TARGETS=${2:-native compute_80 compute_86 compute_89 compute_75 native:fp16 compute_86:fp16}
for t in $TARGETS; do
  arch=${t%%:*}; dtype=; [ "$arch" != "$t" ] && dtype=${t#*:}
  log=${OUT:-/tmp}/check-${t/:/-}.txt
  args=(--no-bench)
  [ "$arch" != native ] && args+=(--arch "$arch")
  [ -n "$dtype" ] && args+=(--compute-dtype "$dtype")
  start=$(date +%s)
  $G "${args[@]}" > "$log" 2>&1
  echo "### $t ($(( $(date +%s) - start )) s): $(grep -m1 '^device' "$log" | sed 's/.*-> //')"
  grep -v '^PASS' "$log" | grep -v '^device' | tail -12
done
