#!/usr/bin/env bash
# Flash attention at head dim 256 (branch d256) on the lent GPU machine, from the repository root, in parts that
# each fit one device call. Usage: scripts/device/check_d256.sh DIR PART   (DIR holds qlora and qlora-gpu-check,
# xz'd or not)
#   check   the attention groups ("attention", "attention variations", "attention d256") in bf16 on the card's own
#           target and in fp16; "attention d256" on compute_80 PTX (an A100's 163 KB and its scalar reductions: still
#           the flash path) and on compute_86 PTX (99 KB: the 64-row fallback, named "flash->mma")
#   bench   the attention lines of the benchmarks group (d256 at the Gemma-2-9B shape, flash beside 64-row), then
#           `qlora bench` on gemma-2-9b and gemma-3-12b (2 x 2048)
DIR=$1; PART=$2
for f in qlora qlora-gpu-check; do [ -e "$DIR/$f" ] || xz -dk "$DIR/$f.xz"; chmod +x "$DIR/$f"; done
Q=$DIR/qlora; C=$DIR/qlora-gpu-check
nvidia-smi --query-gpu=name --format=csv,noheader
step() { echo; echo "### $*"; }
case $PART in
check)
  step "bf16: attention groups"
  $C --no-bench --only attention > $OUT/bf16.txt 2>&1; grep -E "FAIL|passed, " $OUT/bf16.txt | head -60
  step "fp16: attention groups"
  $C --no-bench --compute-dtype fp16 --only attention > $OUT/fp16.txt 2>&1; grep -E "FAIL|passed, " $OUT/fp16.txt | head -40
  step "compute_80 (163 KB, flash) and compute_86 (99 KB, 64-row): attention d256"
  $C --no-bench --arch compute_80 --only "attention d256" > $OUT/c80.txt 2>&1; grep -E "FAIL|passed, " $OUT/c80.txt | head -20
  $C --no-bench --arch compute_86 --only "attention d256" > $OUT/c86.txt 2>&1; grep -E "FAIL|passed, " $OUT/c86.txt | head -20 ;;
bench)
  step "benchmarks: attention lines"
  $C --only benchmarks > $OUT/bench.txt 2>&1; grep -E "attention|FAIL" $OUT/bench.txt
  for a in gemma-2-9b gemma-3-12b; do
    step "qlora bench $a 2 x 2048"
    $Q bench --device cuda --arch $a --batch 2 --seq 2048 --lora-r 16 --steps 5 --warmup 2 2>/dev/null | tail -1
  done ;;
esac
