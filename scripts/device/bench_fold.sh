#!/usr/bin/env bash
# The folded LoRA (issue 11; Model/LoRAFoldLayout.swift, `qlora bench --fold-lora on|off`) on the GPU machine.
#   part "check": qlora-gpu-check's `lora fold` groups (the strided kernels against their dense twins and the CPU, the
#                 folded trainer against the unfolded one per family, with and without dropout) in bf16 and fp16, then
#                 every check that trains (fold on by default there), bf16;
#   part "bench": the 1B, 7B and 8B shapes of DESIGN.md's table, fold off then on, twice each, interleaved (dropout 0),
#                 and the 8B shape at dropout 0.05 off / on.
# Usage (repository root): scripts/device/bench_fold.sh DIR [check|bench|all]   (DIR holds qlora and qlora-gpu-check)
source "$(dirname "$0")/binaries.sh"
if [ "$PART" = check ] || [ "$PART" = all ] || [ -z "$PART" ]; then
  step "lora fold checks, bf16"
  $C --no-bench --only "lora fold" | grep -E "FAIL|PASS|passed"
  step "lora fold checks, fp16"
  $C --no-bench --compute-dtype fp16 --only "lora fold" | grep -E "FAIL|passed"
  step "every training check, bf16 (the trainer folds by default)"
  $C --no-bench --only "training,memory,dropout,qwen2,families,nccl,fp16" | grep -E "FAIL|passed"
fi
if [ "$PART" = bench ] || [ "$PART" = all ] || [ -z "$PART" ]; then
  for shape in "llama-3.2-1b 4" "llama-2-7b 2" "llama-3.1-8b 2"; do
    set -- $shape
    step "$1, batch $2 x 2048: fold off / on, twice"
    for fold in off on off on; do
      $Q bench --device cuda --arch $1 --batch $2 --seq 2048 --lora-r 16 --steps 5 --fold-lora $fold 2>/dev/null | tail -1
    done
  done
  step "llama-3.1-8b, dropout 0.05: fold off / on"
  for fold in off on; do
    $Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 5 --lora-dropout 0.05 --fold-lora $fold 2>/dev/null | tail -1
  done
fi
