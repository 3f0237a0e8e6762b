#!/usr/bin/env bash
# The pipelined wgmma attention backward (branch attn9) on the lent H100 (no Swift, no internet), from the repository
# root. PARTS is a comma-separated list run in order (full outputs under $OUT, summaries printed).
# Usage: scripts/device/verify_attn9.sh DIR PARTS   (DIR holds qlora and qlora-gpu-check, xz'd or not)
#   check    the "attention wgmma" group (bf16, then fp16): the pipelined backward against the CPU twin, the mma.sync
#            flash backward and the simple wgmma backward (dk, dv bit for bit); then attention, training, families
#            and memory with QLORA_ATTENTION=wgmma-pipelined (the new backward inside every trainer check)
#   bench    the group's timings: forward and backward at b2 s2048, b1 s16384, b1 s32768 (mma.sync, wgmma, pipelined)
#   longctx  the 8B shape at 2×2048 and 1×32,768 with QLORA_ATTENTION=wgmma and wgmma-pipelined (1×131,072 too
#            when LONG131=1: minutes a step)
source "$(dirname "$0")/binaries.sh"
for part in ${PART//,/ }; do case $part in
check)
  step "attention wgmma (bf16)"
  $C --no-bench --only "attention wgmma" > $OUT/attn9_bf16.txt 2>&1; grep -E "FAIL|passed, " $OUT/attn9_bf16.txt | head -40
  step "attention wgmma (fp16)"
  $C --no-bench --compute-dtype fp16 --only "attention wgmma" > $OUT/attn9_fp16.txt 2>&1; grep -E "FAIL|passed, " $OUT/attn9_fp16.txt | head -40
  step "QLORA_ATTENTION=wgmma-pipelined: attention, training, families, memory"
  QLORA_ATTENTION=wgmma-pipelined $C --no-bench --only "attention,training,families,memory" > $OUT/attn9_trainer.txt 2>&1
  grep -E "FAIL|passed, " $OUT/attn9_trainer.txt | head -30 ;;
bench)
  step "attention wgmma timings"
  $C --only "attention wgmma" > $OUT/attn9_bench_full.txt 2>&1
  grep -E "attention (forward|backward)|FAIL" $OUT/attn9_bench_full.txt | tee $OUT/attn9_bench.txt | head -20 ;;
longctx)
  for k in wgmma wgmma-pipelined; do
    step "QLORA_ATTENTION=$k: 8B 2×2048"
    QLORA_ATTENTION=$k $Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 5 2>/dev/null | tail -1
    step "QLORA_ATTENTION=$k: 8B 1×32,768"
    QLORA_ATTENTION=$k $Q bench --device cuda --arch llama-3.1-8b --batch 1 --seq 32768 --steps 1 --warmup 1 2>/dev/null | tail -1
    if [ "${LONG131:-0}" = 1 ]; then
      step "QLORA_ATTENTION=$k: 8B 1×131,072"
      QLORA_ATTENTION=$k $Q bench --device cuda --arch llama-3.1-8b --batch 1 --seq 131072 --steps 1 --warmup 1 2>/dev/null | tail -1
    fi
  done ;;
*) echo "unknown part $part" ;;
esac; done
