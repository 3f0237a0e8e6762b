#!/usr/bin/env bash
# Session 7's verification on the lent GPU machine (no Swift, no internet), from the repository root, in parts that
# each fit one device call.
# Usage: scripts/device/verify_session7.sh DIR PART   (DIR holds qlora and qlora-gpu-check, xz'd or not)
#   check      qlora-gpu-check --no-bench, bf16 on the card's own target
#   changed    fp16 and compute_86 of the groups in $GROUPS (comma-separated names the helpers' branches added or changed)
#   bench      qlora-gpu-check --only benchmarks (the kernels' microbenchmarks, old beside new)
#   decode     bench-decode on the 8B shape (LoRA r16 unmerged, 128 tokens) with each GEMV in $GEMVS (session 7 also ran
#              `--gemv stream` with and without PDL: both removed in session 8, slower than mma)
#   attention  the 8B shape at 2×2048 and 1×32,768 with each attention kernel in $ATTENTIONS (QLORA_ATTENTION)
#   dropout    the 8B bench with LoRA dropout 0, 0.05 (masks kept) and 0.05 (rehashed), twice each, interleaved
#   weights    the 8B and 1B benches with a block's dequantized weights kept (default) and dequantized again
#   unsloth    ours on the four workloads of DESIGN.md's table, then Unsloth's run_unsloth.sh as it is (needs .refstack)
#   seeds      ours on the four workloads, then the seeds' reference_qlora.py (needs .refstack)
#   seventy    the 70B shape at 2×2048 (the issue's 48 GB budget) and its plan
source "$(dirname "$0")/binaries.sh"
four() { for a in smollm2-135m:4 llama-3.2-1b:4 llama-2-7b:2 llama-3.1-8b:2; do
  $Q bench --device cuda --arch ${a%:*} --batch ${a#*:} --seq 2048 --lora-r 16 --steps 5 --warmup 2 2>/dev/null | tail -1; done; }
case $PART in
check) gpu_check ;;
changed) gpu_check_changed ;;
bench)
  step "benchmarks"
  $C --only benchmarks > $OUT/bench.txt 2>&1; grep -vE "^PASS" $OUT/bench.txt | tail -100 ;;
decode)
  for k in ${GEMVS:-rows mma}; do
    step "bench-decode 8B, r16 unmerged, --gemv $k"
    $Q bench-decode --device cuda --arch llama-3.1-8b --lora-r 16 --tokens 128 --gemv $k 2>&1 | tail -1
  done ;;
attention)
  for k in ${ATTENTIONS:-mma mma-k32 wgmma}; do
    step "QLORA_ATTENTION=$k: 8B 2×2048, then 1×32,768"
    QLORA_ATTENTION=$k $Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 5 2>/dev/null | tail -1
    QLORA_ATTENTION=$k $Q bench --device cuda --arch llama-3.1-8b --batch 1 --seq 32768 --steps 1 --warmup 1 2>/dev/null | tail -1
  done ;;
dropout)
  step "8B shape, LoRA dropout 0 / 0.05 kept masks / 0.05 rehashed (twice, interleaved)"
  for r in 1 2; do
    for p in "0 auto" "0.05 on" "0.05 off"; do set -- $p
      $Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 5 --lora-dropout $1 --keep-dropout-masks $2 2>/dev/null | tail -1
    done
  done ;;
weights)
  for r in 1 2; do
    for a in llama-3.1-8b:2 llama-3.2-1b:4; do for kw in on off; do
      $Q bench --device cuda --arch ${a%:*} --batch ${a#*:} --seq 2048 --lora-r 16 --steps 5 --keep-block-weights $kw 2>/dev/null | tail -1
    done; done
  done ;;
unsloth)
  step "ours, four workloads"; four
  step "Unsloth (run_unsloth.sh)"; bash .refstack/run_unsloth.sh 2>&1 | grep -E '^\{|failed' ;;
seeds)
  step "ours, four workloads"; four
  step "the seeds' stack (reference_qlora.py)"
  python3 -m zipfile -e .refstack/bitsandbytes-0.50.2-cuda130-slim.zip /tmp/bnb
  PYTHONPATH=/tmp/bnb PYTHONUNBUFFERED=1 python3 .refstack/reference_qlora.py smollm2-135m,llama-3.2-1b,llama-2-7b,llama-3.1-8b 2>&1 | grep -E '^\{|rror' ;;
seventy)
  step "70B plan"; $Q plan --arch llama-3.1-70b --batch 2 --seq 2048 --gpu-memory 48,80
  step "70B 2×2048 under --gpu-memory 48"
  /usr/bin/time -v $Q bench --device cuda --arch llama-3.1-70b --batch 2 --seq 2048 --lora-r 16 --steps 3 --warmup 1 --gpu-memory 48 2>$OUT/t70.txt | tail -1
  grep -E "Maximum resident|rror" $OUT/t70.txt | head ;;
esac
