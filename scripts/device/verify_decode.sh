#!/usr/bin/env bash
# Batch-1 decode (nf4_gemv_mma beside nf4_gemv, lora_a_rows before each GEMV) on the lent GPU machine, from the
# repository root, in parts that each fit one device call.
# Usage: scripts/device/verify_decode.sh DIR PART   (DIR holds qlora and qlora-gpu-check, xz'd or not)
#   check    the decode groups: bf16 on the card's own target, fp16, compute_86 PTX
#   bench    the GEMV microbenchmarks (qlora-gpu-check --only benchmarks, the nf4 gemv lines: rows, splitk, mma and
#            "lora A + mma" (the two launches decode makes for a group), per 8B shape)
#   speed    bench-decode on the 8B shape with each GEMV (rows, mma), twice, interleaved
#   profile  per-kernel split (--profile) with mma, and Nsight Compute on nf4_gemv_mma and lora_a_rows
source "$(dirname "$0")/binaries.sh"
OUT=${OUT:-/tmp}
D="decode gemv,inference fixture,inference random,batched,family generation"
B="--device cuda --arch llama-3.1-8b --lora-r 16 --tokens 128"
case $PART in
check)
  step "bf16, own target: $D"
  $C --no-bench --only "$D" > $OUT/decode_check.txt 2>&1; grep -E "FAIL|rror|passed, " $OUT/decode_check.txt | head -40
  step "fp16: $D"
  $C --no-bench --compute-dtype fp16 --only "$D" > $OUT/decode_fp16.txt 2>&1; grep -E "FAIL|rror|passed, " $OUT/decode_fp16.txt | head -40
  step "compute_86 (bf16): $D"
  $C --no-bench --arch compute_86 --only "$D" > $OUT/decode_c86.txt 2>&1; grep -E "FAIL|rror|passed, " $OUT/decode_c86.txt | head -40 ;;
bench)
  step "GEMV microbenchmarks"
  $C --only benchmarks > $OUT/decode_bench.txt 2>&1; grep -E "nf4 gemv|rror" $OUT/decode_bench.txt ;;
speed)
  for round in 1 2; do
    for k in rows mma; do
      step "bench-decode --gemv $k (round $round)"; $Q bench-decode $B --gemv $k 2>&1 | tail -1
    done
  done ;;
profile)
  step "--profile, --gemv mma"; $Q bench-decode $B --gemv mma --profile 2>&1 | tail -25
  step "ncu: nf4_gemv_mma + lora_a_rows (layer 1's groups)"
  ncu --clock-control none -k regex:'nf4_gemv|lora_a_rows' --launch-skip 8 --launch-count 8 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
    --section Occupancy --section LaunchStats \
    $Q bench-decode --device cuda --arch llama-3.1-8b --lora-r 16 --tokens 2 --no-graph --gemv mma > $OUT/decode_ncu_mma.txt 2>&1
  grep -E "nf4_gemv|lora_a_rows|Duration|DRAM Throughput|Achieved Occupancy|Issue Slots Busy|Eligible Warps|L2 Hit" \
    $OUT/decode_ncu_mma.txt | head -80 ;;
esac
