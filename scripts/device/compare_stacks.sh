#!/usr/bin/env bash
# Our `qlora bench` and one peer stack on the four training workloads, in one device call (so the ratios compare
# like with like). Usage, from the repository root on the GPU machine, with ../shared/bench copied to .refstack:
#   scripts/device/compare_stacks.sh path/to/qlora seeds|unsloth
Q=$1; PEER=$2
declare -A BATCH=([smollm2-135m]=4 [llama-3.2-1b]=4 [llama-2-7b]=2 [llama-3.1-8b]=2)
for a in smollm2-135m llama-3.2-1b llama-2-7b llama-3.1-8b; do
  $Q bench --device cuda --arch $a --batch ${BATCH[$a]} --seq 2048 --lora-r 16 --steps 5 2>/dev/null | tail -1
done
case $PEER in
  seeds)
    python3 -m zipfile -e .refstack/bitsandbytes-0.50.2-cuda130-slim.zip /tmp/bnb
    for a in smollm2-135m llama-3.2-1b llama-2-7b llama-3.1-8b; do
      PYTHONPATH=/tmp/bnb PYTHONUNBUFFERED=1 python3 .refstack/reference_qlora.py $a 2>/dev/null | tail -1
    done ;;
  unsloth) bash .refstack/run_unsloth.sh ;;
esac
