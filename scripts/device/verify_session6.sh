#!/usr/bin/env bash
# Session 6's verification on the lent GPU machine (no Swift, no internet), from the repository root, in parts that
# each fit one device call.
# Usage: scripts/device/verify_session6.sh DIR PART   (DIR holds qlora and qlora-gpu-check, xz'd or not)
#   check      qlora-gpu-check --no-bench, bf16 on the card's own target
#   longctx    the 8B shape at 1×32,768 (80 GB), and at the longest sequence the plan allows under --gpu-memory 24
#   ports      fp16 and compute_86 (99 KB shared memory) of the groups GROUPS names (default: all but benchmarks)
#   bench      qlora-gpu-check --only benchmarks
#   dropout    the 8B bench with LoRA dropout 0 and 0.05, twice each, interleaved
#   dropoutmasks  the same with 0.05 twice over: the masks kept as bits (hashed once a step, the default) and
#              --keep-dropout-masks off (hashed again in the backward, session 6's path), interleaved twice
#   decode     bench-decode on the 8B shape (LoRA r16 unmerged, 128 tokens)
#   changed    fp16 and compute_86 of the groups the helpers' branches added or changed
#   speed      dropout 0 / 0.05 on the 8B shape, decode with both GEMVs, the Gemma shapes (head dim 256 flash)
#   unsloth    the 8B bench (dropout 0) beside Unsloth's run_unsloth.sh llama-3.1-8b (needs .refstack = ../shared/bench)
source "$(dirname "$0")/binaries.sh"
case $PART in
check)
  step "qlora-gpu-check --no-bench"
  (time $C --no-bench) > $OUT/check.txt 2>&1
  grep -E "FAIL|rror" $OUT/check.txt | head -60; grep -E "passed, " $OUT/check.txt; tail -3 $OUT/check.txt ;;
longctx)
  step "plan: 8B under 24 GiB"
  $Q plan --arch llama-3.1-8b --seq 106496 --gpu-memory 24
  step "8B 1×32,768 (80 GB)"
  /usr/bin/time -v $Q bench --device cuda --arch llama-3.1-8b --batch 1 --seq 32768 --steps 1 --warmup 1 2>$OUT/t32k.txt | tail -1
  grep -E "Maximum resident" $OUT/t32k.txt
  step "8B 1×106,496 under --gpu-memory 24"
  /usr/bin/time -v $Q bench --device cuda --arch llama-3.1-8b --batch 1 --seq 106496 --steps 1 --warmup 0 --gpu-memory 24 2>$OUT/t106k.txt | tail -1
  grep -E "Maximum resident|rror" $OUT/t106k.txt | head ;;
ports)
  G=${GROUPS_ONLY:-attention,family,training,dropout,rmsnorm,swiglu,rope,embedding,cross,batched,inference,decode,nf4}
  step "fp16: $G"
  $C --no-bench --compute-dtype fp16 --only "$G" > $OUT/fp16.txt 2>&1; grep -E "FAIL|passed, " $OUT/fp16.txt | head -30
  step "compute_86 (bf16): $G"
  $C --no-bench --arch compute_86 --only "$G" > $OUT/c86.txt 2>&1; grep -E "FAIL|passed, " $OUT/c86.txt | head -30 ;;
bench)
  step "benchmarks"
  $C --only benchmarks > $OUT/bench.txt 2>&1; grep -vE "^PASS" $OUT/bench.txt | tail -80 ;;
dropout)
  step "8B shape, LoRA dropout 0 and 0.05 (twice each, interleaved)"
  for p in 0 0.05 0 0.05; do
    $Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 5 --lora-dropout $p 2>/dev/null | tail -1
  done ;;
dropoutmasks)
  step "8B shape, LoRA dropout 0 / 0.05 masks kept / 0.05 rehashed (twice each, interleaved)"
  for m in "0 auto" "0.05 auto" "0.05 off" "0 auto" "0.05 auto" "0.05 off"; do
    set -- $m
    $Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 5 --lora-dropout $1 --keep-dropout-masks $2 2>/dev/null | tail -1
  done ;;
decode)
  step "bench-decode 8B, r16 unmerged"
  $Q bench-decode --device cuda --arch llama-3.1-8b --lora-r 16 --tokens 128 2>&1 | tail -3 ;;
changed)
  G="attention d256,attention variations,ring kv kernels,family generation,decode gemv,lora dropout,dropout,nccl"
  step "fp16: $G"
  $C --no-bench --compute-dtype fp16 --only "$G" > $OUT/fp16.txt 2>&1; grep -E "FAIL|passed, " $OUT/fp16.txt | head -30
  G86="attention d256,ring kv kernels,family generation,decode gemv"
  step "compute_86 (bf16): $G86"
  $C --no-bench --arch compute_86 --only "$G86" > $OUT/c86.txt 2>&1; grep -E "FAIL|passed, " $OUT/c86.txt | head -30 ;;
speed)
  step "8B shape, LoRA dropout 0 and 0.05 (twice each, interleaved)"
  for p in 0 0.05 0 0.05; do
    $Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 5 --lora-dropout $p 2>/dev/null | tail -1
  done
  step "bench-decode 8B, r16 unmerged, rows then mma"
  for k in rows mma; do $Q bench-decode --device cuda --arch llama-3.1-8b --lora-r 16 --tokens 128 --gemv $k 2>&1 | tail -1; done
  step "Gemma shapes (head dim 256), 2 x 2048, r16"
  for a in gemma-2-9b gemma-3-12b; do
    $Q bench --device cuda --arch $a --batch 2 --seq 2048 --lora-r 16 --steps 3 2>/dev/null | tail -1
  done ;;
unsloth)
  step "ours, 8B 2×2048 r16"
  $Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 5 2>/dev/null | tail -1
  step "Unsloth (run_unsloth.sh llama-3.1-8b)"
  bash .refstack/run_unsloth.sh llama-3.1-8b 2>&1 | tail -3
  step "ours again"
  $Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 5 2>/dev/null | tail -1 ;;
esac
