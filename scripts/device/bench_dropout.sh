#!/usr/bin/env bash
# LoRA dropout's cost (issue 11: at most 3% of tokens/s at p = 0.05) and correctness on the GPU machine, in one call:
# the fused kernels (Kernels/lora_dropout.cu) against their CPU twins (mask bits included) and every check that trains
# with dropout (the fixture, the families, the memory plan's peak), in bf16 and fp16; the benchmark group (its "lora
# linear step" lines: no dropout, the trainer's dropout path, hashing 4x as before, the unfused path, at the 8B shapes;
# and each fused kernel beside the cuBLAS GEMM it replaces, time and GB/s); then the 8B bench with dropout 0 and 0.05,
# twice each, interleaved.
# Usage (repository root): scripts/device/bench_dropout.sh path/to/qlora path/to/qlora-gpu-check
Q=${1:-./qlora}
C=${2:-./qlora-gpu-check}
$C --no-bench --only "dropout,training,memory,qwen2,families" | grep -E "FAIL|dropout|passed"
$C --no-bench --compute-dtype fp16 --only "dropout" | grep -E "FAIL|passed"
$C --only benchmarks | grep -E "FAIL|lora linear|cuBLAS|passed"
for p in 0 0.05 0 0.05; do
  $Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 5 --lora-dropout $p 2>/dev/null | tail -1
done
