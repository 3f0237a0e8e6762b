#!/usr/bin/env bash
# The memory table's 24 GB rows checked on a larger GPU: for each architecture, LoRA rank and checkpoint placement,
# `qlora plan` gives the largest batch of 2048-token rows that fits a 24 GiB card, and `qlora bench --gpu-memory 24`
# trains it (one timed step) within that budget, printing the planned and the measured peak side by side. Both run as
# qlora train does by default (and as the table is planned): paged_adamw_8bit, LoRA dropout 0.05.
# Usage (repository root, on the GPU machine): scripts/device/check_memory_plan.sh path/to/qlora [GiB]
Q=$1; GIB=${2:-24}
for arch in smollm2-135m llama-3.2-1b llama-2-7b llama-3.1-8b; do
  for r in 16 64; do
    for off in on off; do
      b=$($Q plan --arch $arch --seq 2048 --lora-r $r --offload-checkpoints $off --gpu-memory $GIB --optimizer paged_adamw_8bit \
            --lora-dropout 0.05 | sed -n 's/.*largest batch of 2048: //p')
      if [ -z "$b" ] || [ "$b" = 0 ]; then echo "$arch r$r offload $off: nothing fits"; continue; fi
      line=$($Q bench --device cuda --arch $arch --batch $b --seq 2048 --lora-r $r --offload-checkpoints $off --gpu-memory $GIB \
             --optimizer paged_adamw_8bit --lora-dropout 0.05 \
             --steps 1 --warmup 0 2>&1 | tail -1)
      echo "$arch r$r offload $off batch $b: $line"
    done
  done
done
