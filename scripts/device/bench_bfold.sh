#!/usr/bin/env bash
# Session 9's branch bfold9 on the GPU machine (issue 11): the LoRA backward folded into o_proj's and down_proj's dx
# GEMM (`qlora bench --fold-lora-backward on|off`, Model/LoRAFoldLayout.swift) and the paged optimizer's streamed state
# (Training/CUDAOptimizer.swift; `qlora bench` now steps with qlora train's paged_adamw_8bit by default).
#   part "check": qlora-gpu-check's `lora fold` groups (now also the strided RMSNorm backward and each fold alone
#                 against the unfolded trainer) and "paged optimizer streamed" (bit for bit against adamw_8bit, with its
#                 8B-shape timing line), bf16 and fp16; then every training check, bf16;
#   part "fold":  the 1B, 7B and 8B shapes of DESIGN.md's table, backward fold off then on, twice each, interleaved
#                 (dropout 0, the default optimizer), and the 8B shape at dropout 0.05 off / on (nothing folds under
#                 dropout: the same speed is expected);
#   part "optimizer": the 8B and 1B shapes with each optimizer (optimizer_ms: its device time a step; peak memory).
# Usage (repository root): scripts/device/bench_bfold.sh DIR [check|fold|optimizer|all]   (DIR holds qlora and qlora-gpu-check)
source "$(dirname "$0")/binaries.sh"
if [ "$PART" = check ] || [ "$PART" = all ] || [ -z "$PART" ]; then
  step "lora fold and paged optimizer checks, bf16 (with the optimizer's timing line)"
  $C --only "lora fold,paged optimizer" | grep -E "FAIL|PASS|passed|bench optimizer"
  step "the same, fp16"
  $C --no-bench --compute-dtype fp16 --only "lora fold,paged optimizer" | grep -E "FAIL|passed"
  step "every training check, bf16"
  $C --no-bench --only "training,memory,dropout,qwen2,families,nccl,fp16,adamw8bit" | grep -E "FAIL|passed"
fi
if [ "$PART" = fold ] || [ "$PART" = all ] || [ -z "$PART" ]; then
  for shape in "llama-3.2-1b 4" "llama-2-7b 2" "llama-3.1-8b 2"; do
    set -- $shape
    step "$1, batch $2 x 2048: backward fold off / on, twice"
    for fold in off on off on; do
      $Q bench --device cuda --arch $1 --batch $2 --seq 2048 --lora-r 16 --steps 5 --fold-lora-backward $fold 2>/dev/null | tail -1
    done
  done
  step "llama-3.1-8b, dropout 0.05: backward fold off / on"
  for fold in off on; do
    $Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 5 --lora-dropout 0.05 --fold-lora-backward $fold 2>/dev/null | tail -1
  done
fi
if [ "$PART" = optimizer ] || [ "$PART" = all ] || [ -z "$PART" ]; then
  for shape in "llama-3.1-8b 2" "llama-3.2-1b 4"; do
    set -- $shape
    step "$1, batch $2 x 2048: the optimizers (optimizer_ms: the optimizer's device time a step)"
    for optimizer in fused_adamw paged_adamw_8bit adamw_8bit paged_adamw_8bit; do
      $Q bench --device cuda --arch $1 --batch $2 --seq 2048 --lora-r 16 --steps 5 --optimizer $optimizer 2>/dev/null | tail -1
    done
  done
fi
