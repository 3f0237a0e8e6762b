#!/usr/bin/env bash
# Session 7's decode work (branch `decode`: nf4_gemv_stream, programmatic dependent launch, rope_append_rows on a grid)
# on the lent GPU machine, from the repository root, in parts that each fit one device call.
# Usage: scripts/device/verify_decode.sh DIR PART   (DIR holds qlora and qlora-gpu-check, xz'd or not)
#   check    the decode groups: bf16 on the card's own target, fp16, compute_86 PTX (no griddepcontrol: plain launches)
#   bench    the GEMV microbenchmarks (qlora-gpu-check --only benchmarks, the nf4 gemv lines)
#   speed    bench-decode on the 8B shape with each GEMV, stream also without PDL, each twice, interleaved
#   profile  per-kernel split (--profile) and Nsight Compute on nf4_gemv_stream and rope_append_rows
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
    for k in rows mma stream; do
      step "bench-decode --gemv $k (round $round)"; $Q bench-decode $B --gemv $k 2>&1 | tail -1
    done
    step "bench-decode --gemv stream, QLORA_NO_PDL=1 (round $round)"; QLORA_NO_PDL=1 $Q bench-decode $B --gemv stream 2>&1 | tail -1
  done ;;
profile)
  for k in rows stream; do step "--profile, --gemv $k"; $Q bench-decode $B --gemv $k --profile 2>&1 | tail -25; done
  step "ncu: nf4_gemv_stream (layer 0's four GEMVs) and rope_append_rows"
  ncu --clock-control none -k regex:'nf4_gemv_stream|rope_append_rows' --launch-skip 5 --launch-count 10 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
    --section Occupancy --section LaunchStats \
    $Q bench-decode --device cuda --arch llama-3.1-8b --lora-r 16 --tokens 2 --no-graph --gemv stream > $OUT/decode_ncu.txt 2>&1
  grep -E "nf4_gemv_stream|rope_append_rows|Duration|DRAM Throughput|Achieved Occupancy|Issue Slots Busy|Eligible Warps|L2 Hit" \
    $OUT/decode_ncu.txt | head -80 ;;
esac
