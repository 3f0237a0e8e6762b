#!/usr/bin/env bash
# The four training workloads of DESIGN.md with `qlora bench` (one JSON line each), as issue 5's table measures them,
# with the default memory placement and with everything on the GPU; then batch-1 decode on the 8B shape.
# Usage (repository root, on the GPU machine): scripts/device/bench_all.sh path/to/qlora
Q=${1:-./qlora}
for w in "smollm2-135m 4" "llama-3.2-1b 4" "llama-2-7b 2" "llama-3.1-8b 2"; do
  set -- $w
  $Q bench --device cuda --arch $1 --batch $2 --seq 2048 --lora-r 16 --steps 5 2>/dev/null | tail -1
  $Q bench --device cuda --arch $1 --batch $2 --seq 2048 --lora-r 16 --steps 5 --offload-checkpoints off --host-embedding off 2>/dev/null | tail -1
done
$Q bench-decode --device cuda --arch llama-3.1-8b --lora-r 16 --tokens 128 2>/dev/null | tail -1
