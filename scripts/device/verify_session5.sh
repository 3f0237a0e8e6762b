#!/usr/bin/env bash
# Session 5's verification on the lent GPU machine (no Swift, no internet), from the repository root, in parts that
# each fit one device call: the GPU check (every kernel and the family trainer and generation checks), the fp16 and
# 99 KB-shared-memory (compute_86) paths of what changed, the benchmarks group, LoRA dropout's cost on the 8B shape,
# and the family shapes beside the seeds' stack (scripts/device/bench_families.sh).
# Usage: scripts/device/verify_session5.sh DIR PART   (DIR holds qlora and qlora-gpu-check, xz'd or not)
#   check   qlora-gpu-check --no-bench, bf16 on the card's own target
#   ports   fp16, and compute_86 (99 KB of shared memory: d96/d128 attention on the 64-row kernels), of the groups
#           this session changed; then the benchmarks group
#   dropout the 8B bench with LoRA dropout 0 and 0.05, twice each, interleaved
#   families-1 / families-2   bench_families.sh on qwen3-8b gemma-2-9b / gemma-3-12b phi-4-mini
DIR=$1; PART=$2
for f in qlora qlora-gpu-check; do [ -e "$DIR/$f" ] || xz -dk "$DIR/$f.xz"; chmod +x "$DIR/$f"; done
Q=$DIR/qlora; C=$DIR/qlora-gpu-check
nvidia-smi --query-gpu=name --format=csv,noheader
step() { echo; echo "### $*"; }
case $PART in
check)
  step "qlora-gpu-check --no-bench"
  (time $C --no-bench) > $OUT/check.txt 2>&1
  grep -E "FAIL|rror" $OUT/check.txt | head -60; grep -E "passed, " $OUT/check.txt; tail -3 $OUT/check.txt ;;
ports)
  CHECK_GROUPS="attention,family,training,dropout,rmsnorm,rope,swiglu,embedding,cross,batched,inference"
  step "fp16: $CHECK_GROUPS"
  $C --no-bench --compute-dtype fp16 --only "$CHECK_GROUPS" > $OUT/fp16.txt 2>&1; grep -E "FAIL|passed, " $OUT/fp16.txt | head -30
  step "compute_86 (bf16): attention, family"
  $C --no-bench --arch compute_86 --only "attention,family" > $OUT/c86.txt 2>&1; grep -E "FAIL|passed, " $OUT/c86.txt | head -30
  step "benchmarks"
  $C --only benchmarks > $OUT/bench.txt 2>&1; grep -vE "^PASS" $OUT/bench.txt | tail -60 ;;
dropout)
  step "8B shape, LoRA dropout 0 and 0.05 (twice each, interleaved)"
  for p in 0 0.05 0 0.05; do
    $Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 5 --lora-dropout $p 2>/dev/null | tail -1
  done ;;
families-1) scripts/device/bench_families.sh $Q qwen3-8b gemma-2-9b ;;
families-2) scripts/device/bench_families.sh $Q gemma-3-12b phi-4-mini ;;
esac
