#!/usr/bin/env bash
# The four bench workloads of DESIGN.md on the card's own kernels and on the portable PTX of older architectures
# (QLORA_KERNEL_ARCH=compute_XY: the kernels an A100 or an RTX 3090/4090 would run, with their shared-memory limits),
# so that a regression in the portable paths shows. Usage (repository root, GPU machine):
#   scripts/device/bench_targets.sh path/to/qlora [TARGETS]
Q=$1; TARGETS=${2:-native compute_80 compute_86}
for t in $TARGETS; do
  for w in "smollm2-135m 4" "llama-3.2-1b 4" "llama-2-7b 2" "llama-3.1-8b 2"; do
    set -- $w
    if [ "$t" = native ]; then unset QLORA_KERNEL_ARCH; else export QLORA_KERNEL_ARCH=$t; fi
    echo "$t: $($Q bench --device cuda --arch $1 --batch $2 --seq 2048 --lora-r 16 --steps 5 2>&1 | tail -1)"
  done
done
unset QLORA_KERNEL_ARCH
