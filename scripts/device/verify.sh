#!/usr/bin/env bash
# The verification on the lent GPU machine (session 8's parts and those added since) (no Swift, no internet), from the repository root. PARTS is a
# comma-separated list run in order (each writes its full output under $OUT and prints a summary).
# Usage: scripts/device/verify.sh DIR PARTS   (DIR holds qlora and qlora-gpu-check, xz'd or not)
#   check      qlora-gpu-check --no-bench, bf16 on the card's own target
#   changed    fp16 and compute_86 of the groups in $CHECK_GROUPS (comma-separated)
#   bench      qlora-gpu-check --only benchmarks (the kernels' microbenchmarks, old beside new)
#   seeds      ours on the four workloads of DESIGN.md's table (unless unsloth ran them in this call), then the
#              seeds' reference_qlora.py (needs .refstack)
#   unsloth    ours on the four workloads, then Unsloth's run_unsloth.sh as it is (needs .refstack)
#   seventy    the 70B shape at 2×2048 under --gpu-memory 48 and its plan
#   longctx    the 8B shape at 1×32,768 (and 1×131,072 when LONG131=1: ~2.5 minutes a step) with $ATTENTIONS
#   longseq    the 8B shape's planned longest sequences for a 48 GiB budget and the whole card on its first 2 blocks
#              (bench --layers 2: the same working set per block; the other 30 blocks add their weights, counted by
#              the plan, and ~15× the time: a full step would take 8-25 minutes, past a call's limit)
#   keepattn   the wgmma backward (QLORA_ATTENTION=wgmma) through the trainer's checks, fp16, its timings; then the 8B
#              shape at 2×2048 and 1×32,768 and the 1B at 4×2048 with QLORA_ATTENTION wgmma-forward / wgmma and
#              --keep-attention off / on
#   fold       the 8B and 1B shapes with --fold-lora off / on
#   attnpipe   the pipelined wgmma attention (session 9): the "attention wgmma" group in bf16 and fp16, then attention,
#              training, families and memory with QLORA_ATTENTION=wgmma-pipelined (the new kernels in every trainer check)
#   attnbench  the attention wgmma group's timings (forward and backward beside mma.sync) into $OUT/attn_bench.txt
#   decode     bench-decode on the 8B shape (LoRA r16 unmerged, 128 tokens) with each GEMV in $GEMVS
#   refdecode  the seeds' stack's batch-1 decode of the same shape (reference_decode.py; needs .refstack)
#   optim      the 8B and 1B benches with the trainer's fused fp32 AdamW and with bench's default paged_adamw_8bit (the
#              peers' optimizer and qlora train's default since session 9)
#   ab         the 8B and 1B benches with each value of $AB_FLAG in $AB_VALUES, twice, interleaved
#   rows       issue 11's rows session 10 could not run: the 8B shape at 1×131,072 and the 70B shape at its planned
#              longest sequence in 80 GB (both on their first 2 blocks, checkpoints offloaded), and LoRA dropout's cost
#              (8B 2×2048 and 1B 4×2048 at --lora-dropout 0 and 0.05, twice, interleaved)
#   profdrop   Nsight Compute's time of every kernel in one step of the 8B shape's first 4 blocks at 2×2048 (and the 1B
#              shape's at 4×2048 when PROFDROP_1B=1), LoRA dropout 0 and 0.05, into $OUT/profdrop_<arch>_<p>.txt
#              (what dropout's cost is made of: scripts/device/kernel_times.py compares two of them)
#   dropab     LoRA dropout's cost: the 8B (2×2048) and 1B (4×2048) benches at --lora-dropout 0 and 0.05 with this build,
#              and at 0.05 with the build in $OLD (another DIR: its masks' hash), interleaved; then the "lora dropout
#              fused" group's per-linear timings
#   profattn   Nsight Compute on the wgmma attention kernels (forward and backward, simple and pipelined) inside one
#              8B step at 1×16,384 (first 2 blocks): throughput, tensor-pipe use, warp stalls, into $OUT/prof_<kernel>.txt
source "$(dirname "$0")/binaries.sh"
# The four workloads of DESIGN.md's table; $FOUR_ARGS (e.g. "--optimizer paged_adamw_8bit") goes to each bench.
four() { for a in smollm2-135m:4 llama-3.2-1b:4 llama-2-7b:2 llama-3.1-8b:2; do
  $Q bench --device cuda --arch ${a%:*} --batch ${a#*:} --seq 2048 --lora-r 16 --steps 5 --warmup 2 $FOUR_ARGS 2>/dev/null | tail -1; done; }
for part in ${PART//,/ }; do case $part in
check) gpu_check ;;
changed) gpu_check_changed ;;
bench)
  step "benchmarks"
  $C --only benchmarks > $OUT/bench.txt 2>&1; grep -vE "^PASS" $OUT/bench.txt | tail -100 ;;
seeds)
  [[ ",$PART," == *,unsloth,* ]] || { step "ours, four workloads"; four; }
  step "the seeds' stack (reference_qlora.py)"
  [ -d /tmp/bnb ] || python3 -m zipfile -e .refstack/bitsandbytes-0.50.2-cuda130-slim.zip /tmp/bnb
  PYTHONPATH=/tmp/bnb PYTHONUNBUFFERED=1 python3 .refstack/reference_qlora.py smollm2-135m,llama-3.2-1b,llama-2-7b,llama-3.1-8b 2>&1 | grep -E '^\{|rror' ;;
unsloth)
  step "ours, four workloads"; four
  step "Unsloth (run_unsloth.sh)"; bash .refstack/run_unsloth.sh 2>&1 | grep -E '^\{|failed' ;;
seventy)
  step "70B plan"; $Q plan --arch llama-3.1-70b --batch 2 --seq 2048 --gpu-memory 48,80 | tail -12
  step "70B 2×2048 under --gpu-memory 48"
  $Q bench --device cuda --arch llama-3.1-70b --batch 2 --seq 2048 --lora-r 16 --steps 3 --warmup 1 --gpu-memory 48 2>$OUT/t70.txt | tail -1
  grep -E "rror" $OUT/t70.txt | head ;;
longctx)
  for k in ${ATTENTIONS:-default}; do
    step "QLORA_ATTENTION=$k: 8B 1×32,768"
    if [ "$k" = default ]; then E=(); else E=(QLORA_ATTENTION=$k); fi
    env "${E[@]}" $Q bench --device cuda --arch llama-3.1-8b --batch 1 --seq 32768 --steps 1 --warmup 1 2>/dev/null | tail -1
    if [ "${LONG131:-0}" = 1 ]; then
      step "QLORA_ATTENTION=$k: 8B 1×131,072 (one step, after one warm-up step)"
      env "${E[@]}" $Q bench --device cuda --arch llama-3.1-8b --batch 1 --seq 131072 --steps 1 --warmup 1 2>/dev/null | tail -1
    fi
  done ;;
longseq)
  # The longest sequences qlora plan gives the 8B shape at dropout 0 (bench's default) on a 48 GiB budget and on the
  # whole card, checkpoints offloaded as the 32-block run offloads them (2 blocks alone would keep them on the GPU).
  for gs in 48:249344 card:449024; do
    if [ "${gs%:*}" = card ]; then B=(); else B=(--gpu-memory ${gs%:*}); fi
    step "8B, first 2 blocks, 1×${gs#*:} ${B[*]:-on the whole card}, checkpoints offloaded"
    /usr/bin/time -f "host peak %M KiB, %e s" $Q bench --device cuda --arch llama-3.1-8b --layers 2 --batch 1 --seq ${gs#*:} --steps 1 --warmup 0 --offload-checkpoints on "${B[@]}" 2>$OUT/longseq.err | tail -1
    grep -E "rror|host peak" $OUT/longseq.err | head -5
  done ;;
keepattn)
  step "QLORA_ATTENTION=wgmma: attention, training and families through the wgmma backward"
  QLORA_ATTENTION=wgmma $C --no-bench --only "attention,training,families,memory" > $OUT/wgmma_bwd.txt 2>&1
  grep -E "FAIL|passed, " $OUT/wgmma_bwd.txt | head -30
  step "fp16: attention wgmma"
  $C --no-bench --compute-dtype fp16 --only "attention wgmma" > $OUT/wgmma_fp16.txt 2>&1; grep -E "FAIL|passed, " $OUT/wgmma_fp16.txt | head
  step "attention wgmma timings"
  $C --only "attention wgmma" 2>&1 | grep -E "attention (forward|backward)|FAIL" | head -20
  for a in wgmma-forward wgmma; do for k in off on; do
    step "QLORA_ATTENTION=$a --keep-attention $k: 8B 2×2048, 1B 4×2048"
    QLORA_ATTENTION=$a $Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 5 --keep-attention $k 2>/dev/null | tail -1
    QLORA_ATTENTION=$a $Q bench --device cuda --arch llama-3.2-1b --batch 4 --seq 2048 --lora-r 16 --steps 5 --keep-attention $k 2>/dev/null | tail -1
  done; done
  for ak in wgmma-forward:off wgmma:off wgmma:on; do
    step "QLORA_ATTENTION=${ak%:*} --keep-attention ${ak#*:}: 8B 1×32,768"
    QLORA_ATTENTION=${ak%:*} $Q bench --device cuda --arch llama-3.1-8b --batch 1 --seq 32768 --steps 1 --warmup 1 --keep-attention ${ak#*:} 2>/dev/null | tail -1
  done ;;
fold)
  for a in llama-3.1-8b:2 llama-3.2-1b:4; do for f in off on; do
    step "--fold-lora $f ${a%:*}"
    $Q bench --device cuda --arch ${a%:*} --batch ${a#*:} --seq 2048 --lora-r 16 --steps 5 --fold-lora $f 2>/dev/null | tail -1
  done; done ;;
attnpipe)
  step "attention wgmma (bf16, fp16)"
  $C --no-bench --only "attention wgmma" > $OUT/attnpipe_bf16.txt 2>&1; grep -E "FAIL|passed, " $OUT/attnpipe_bf16.txt | head -40
  $C --no-bench --compute-dtype fp16 --only "attention wgmma" > $OUT/attnpipe_fp16.txt 2>&1; grep -E "FAIL|passed, " $OUT/attnpipe_fp16.txt | head -20
  step "QLORA_ATTENTION=wgmma-pipelined: attention, training, families, memory"
  QLORA_ATTENTION=wgmma-pipelined $C --no-bench --only "attention,training,families,memory" > $OUT/attnpipe_trainer.txt 2>&1
  grep -E "FAIL|passed, " $OUT/attnpipe_trainer.txt | head -30 ;;
attnbench)
  step "attention wgmma timings"
  $C --only "attention wgmma" > $OUT/attn_bench_full.txt 2>&1
  grep -E "attention (forward|backward)|FAIL" $OUT/attn_bench_full.txt | tee $OUT/attn_bench.txt | head -20 ;;
decode)
  for k in ${GEMVS:-mma}; do
    step "bench-decode 8B, r16 unmerged, --gemv $k"
    $Q bench-decode --device cuda --arch llama-3.1-8b --lora-r 16 --tokens 128 --gemv $k 2>&1 | tail -1
  done ;;
optim)
  for a in llama-3.1-8b:2 llama-3.2-1b:4; do for o in "--optimizer fused_adamw" ""; do
    step "${a%:*} ${o:-paged_adamw_8bit (the default)}"
    $Q bench --device cuda --arch ${a%:*} --batch ${a#*:} --seq 2048 --lora-r 16 --steps 5 $o 2>/dev/null | tail -1
  done; done ;;
refdecode)
  step "the seeds' stack: batch-1 decode, 8B shape, r16 unmerged (reference_decode.py)"
  [ -d /tmp/bnb ] || python3 -m zipfile -e .refstack/bitsandbytes-0.50.2-cuda130-slim.zip /tmp/bnb
  PYTHONPATH=/tmp/bnb PYTHONUNBUFFERED=1 python3 .refstack/reference_decode.py llama-3.1-8b 2>&1 | grep -E '^\{|rror' ;;
ab)
  for r in 1 2; do for a in llama-3.1-8b:2 llama-3.2-1b:4; do for v in $AB_VALUES; do
    step "$AB_FLAG $v ${a%:*}"
    $Q bench --device cuda --arch ${a%:*} --batch ${a#*:} --seq 2048 --lora-r 16 --steps 5 $AB_FLAG $v 2>/dev/null | tail -1
  done; done; done ;;
rows)
  step "8B, first 2 blocks, 1×131,072 (one step after one warm-up), checkpoints offloaded, attention outputs kept"
  /usr/bin/time -f "host peak %M KiB, %e s" $Q bench --device cuda --arch llama-3.1-8b --layers 2 --batch 1 --seq 131072 --steps 1 --warmup 1 --offload-checkpoints on --keep-attention on 2>$OUT/r131.err | tail -1
  grep -E "rror|host peak" $OUT/r131.err | head -5
  step "70B plan for 1×124,672 on the whole card"; $Q plan --arch llama-3.1-70b --batch 1 --seq 124672 --lora-dropout 0 --offload-checkpoints on 2>&1 | tail -4
  step "70B, first 2 blocks, 1×124,672, checkpoints offloaded"
  /usr/bin/time -f "host peak %M KiB, %e s" $Q bench --device cuda --arch llama-3.1-70b --layers 2 --batch 1 --seq 124672 --steps 1 --warmup 0 --offload-checkpoints on 2>$OUT/r70.err | tail -1
  grep -E "rror|host peak" $OUT/r70.err | head -5
  for r in 1 2; do for a in llama-3.1-8b:2 llama-3.2-1b:4; do for d in 0 0.05; do
    step "--lora-dropout $d ${a%:*}"
    $Q bench --device cuda --arch ${a%:*} --batch ${a#*:} --seq 2048 --lora-r 16 --steps 5 --lora-dropout $d 2>/dev/null | tail -1
  done; done; done ;;
profdrop)
  for a in llama-3.1-8b:2 ${PROFDROP_1B:+llama-3.2-1b:4}; do for d in 0 0.05; do
    step "ncu kernel times: ${a%:*} (first 4 blocks) ${a#*:}×2048, --lora-dropout $d"
    ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
      $Q bench --device cuda --arch ${a%:*} --layers 4 --batch ${a#*:} --seq 2048 --lora-r 16 --steps 1 --warmup 0 --lora-dropout $d \
      > $OUT/profdrop_${a%:*}_$d.txt 2>&1
    tail -1 $OUT/profdrop_${a%:*}_$d.txt | cut -c1-200
  done; done ;;
dropab)
  OLDQ=$OLD/qlora; [ -e $OLDQ ] || xz -dk $OLDQ.xz; chmod +x $OLDQ
  for run in llama-3.1-8b:2:new:0 llama-3.1-8b:2:new:0.05 llama-3.1-8b:2:old:0.05 llama-3.1-8b:2:new:0 llama-3.1-8b:2:new:0.05 \
             llama-3.2-1b:4:new:0 llama-3.2-1b:4:new:0.05 llama-3.2-1b:4:old:0.05 llama-3.2-1b:4:new:0 llama-3.2-1b:4:new:0.05; do
    IFS=: read -r a b which d <<< "$run"; if [ $which = new ]; then BIN=$Q; else BIN=$OLDQ; fi
    step "$which build: $a ${b}×2048 --lora-dropout $d"
    $BIN bench --device cuda --arch $a --batch $b --seq 2048 --lora-r 16 --steps 5 --lora-dropout $d 2>/dev/null | tail -1 | grep -oE '"tokens_per_s": [0-9.]+|"peak_alloc_gib": [0-9.]+' | tr '\n' ' '; echo
  done
  step "lora dropout fused: per-linear timings"
  $C --only "lora dropout fused" > $OUT/dropout_bench.txt 2>&1; grep -vE "^PASS" $OUT/dropout_bench.txt | tail -20 ;;
profattn)
  SECTIONS="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats"
  for k in wgmma:forward_d128 wgmma:backward_d128 wgmma-pipelined:forward_pipelined_d128 wgmma-pipelined:backward_pipelined_d128; do
    step "ncu attention_wgmma_${k#*:} (QLORA_ATTENTION=${k%:*}, 8B 1×16,384)"
    QLORA_ATTENTION=${k%:*} ncu --clock-control none -k regex:"attention_wgmma_${k#*:}\$" --launch-count 1 $SECTIONS \
      --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,smsp__average_warp_latency_issue_stalled_barrier,smsp__average_warp_latency_issue_stalled_long_scoreboard,smsp__average_warp_latency_issue_stalled_wait \
      $Q bench --device cuda --arch llama-3.1-8b --layers 2 --batch 1 --seq 16384 --steps 1 --warmup 0 > $OUT/prof_${k#*:}.txt 2>&1
    grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|L1/TEX Hit|Shared|Registers Per|Achieved Occupancy|Issued Ipc|No Eligible|Warp Cycles Per Issued|gmma|stalled|Bank|Stall" $OUT/prof_${k#*:}.txt | head -40
  done ;;
*) echo "unknown part $part" ;;
esac; done
