#!/usr/bin/env bash
# Session 7's profiles on the lent GPU machine (Nsight Compute), from the repository root.
# Usage: scripts/device/profile_session7.sh DIR PART   (DIR holds qlora, xz'd or not)
#   decode   every kernel of a batch-1 decode step (plain launches, durations), then the NF4 GEMVs' sections
#   attn     the d128 flash forward and backward at the 8B shape, 1×16,384
#   train    every kernel of one 8B training step at 2×2048 (durations), summed by kernel name
#   unsloth  ours and Unsloth (run_unsloth.sh as it is) on the four workloads of DESIGN.md's table (needs .refstack)
#   seeds    ours and the seeds' stack (reference_qlora.py) on the same four workloads (needs .refstack)
DIR=$1; PART=$2
[ -e "$DIR/qlora" ] || xz -dk "$DIR/qlora.xz"; chmod +x "$DIR/qlora"; Q=$DIR/qlora
NCU="ncu --clock-control none"
SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis"
sum_csv() {  # sums gpu__time_duration by kernel name from ncu's CSV (ns), prints the largest
  python3 - "$1" "${2:-0}" <<'PY'
import csv, sys, collections
allrows = list(csv.reader(open(sys.argv[1])))
h = next(i for i, r in enumerate(allrows) if "Kernel Name" in r)
hdr = allrows[h]; rows = [hdr] + [r for r in allrows[h + 1:] if len(r) == len(hdr)]; k = hdr.index("Kernel Name"); v = hdr.index("Metric Value"); u = hdr.index("Metric Unit") if "Metric Unit" in hdr else None
data = []
for r in rows[1:]:
    try: x = float(r[v].replace(",", ""))
    except ValueError: continue
    unit = r[u] if u is not None else "ns"
    x = x * {"ns": 1, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6, "nsecond": 1}.get(unit, 1)
    data.append((r[k].split("(")[0], x))
tail = int(sys.argv[2])
if tail: data = data[-tail:]
agg = collections.OrderedDict()
for n, x in data: c, t = agg.get(n, (0, 0.0)); agg[n] = (c + 1, t + x)
tot = sum(t for c, t in agg.values())
print(f"{len(data)} kernels, {tot/1e6:.3f} ms in all")
for n, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:40]:
    print(f"{t/1e6:10.3f} ms {100*t/tot:5.1f}% {c:6d}x  {n[:110]}")
PY
}
case $PART in
decode)
  echo "### every kernel of decode (2 tokens, plain launches); the last token's kernels summed"
  $NCU --metrics gpu__time_duration.sum --csv $Q bench-decode --device cuda --arch llama-3.1-8b --lora-r 16 --tokens 2 --no-graph > $OUT/decode_all.csv 2> $OUT/decode_all.err
  n=$(grep -c "gpu__time_duration" $OUT/decode_all.csv); echo "rows: $n"
  # one token = the kernels after the last prefill: take the last half of the decode launches
  python3 - $OUT/decode_all.csv <<'PY'
import csv, sys
rows=list(csv.reader(open(sys.argv[1]))); h=next(i for i,r in enumerate(rows) if "Kernel Name" in r); k=rows[h].index("Kernel Name")
names=[r[k].split("(")[0] for r in rows[h+1:] if len(r)==len(rows[h])]
print(len(names), "kernels; the last 60:"); print("\n".join(names[-60:]))
PY
  sum_csv $OUT/decode_all.csv 420 > $OUT/decode_last.txt; cat $OUT/decode_last.txt
  for kind in rows mma; do
    echo "### NF4 GEMV sections, --gemv $kind (layer 0: q|k|v, o, gate|up, down)"
    $NCU -k regex:nf4_gemv --launch-count 4 $SECTIONS $Q bench-decode --device cuda --arch llama-3.1-8b --lora-r 16 --tokens 1 --no-graph --gemv $kind > $OUT/gemv_$kind.txt 2>&1
    grep -E "nf4_gemv|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Grid Size|Waves Per SM|Issued Ipc|No Eligible|Warp Cycles Per Issued" $OUT/gemv_$kind.txt | head -80
  done ;;
attn)
  for k in forward backward; do
    echo "### attention_fa_$k d128, 8B shape 1×16,384"
    $NCU -k regex:attention_fa_${k}_d128 --launch-count 1 $SECTIONS --section SourceCounters $Q bench --device cuda --arch llama-3.1-8b --batch 1 --seq 16384 --steps 1 --warmup 0 > $OUT/attn_$k.txt 2>&1
    grep -E "attention_fa|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Shared Memory Config|Dynamic Shared|Grid Size|Block Size|Waves Per SM|Issued Ipc|No Eligible|Warp Cycles Per Issued|Tensor|Bank" $OUT/attn_$k.txt | head -50
  done ;;
train)
  echo "### every kernel of one 8B training step (2×2048, r16), summed by name"
  timeout 400 $NCU --metrics gpu__time_duration.sum --csv $Q bench --device cuda --arch llama-3.1-8b --batch 2 --seq 2048 --lora-r 16 --steps 1 --warmup 0 > $OUT/train_all.csv 2> $OUT/train_all.err
  echo "rc $?"; sum_csv $OUT/train_all.csv > $OUT/train_sum.txt; cat $OUT/train_sum.txt ;;
unsloth)
  for a in smollm2-135m:4 llama-3.2-1b:4 llama-2-7b:2 llama-3.1-8b:2; do
    $Q bench --device cuda --arch ${a%:*} --batch ${a#*:} --seq 2048 --lora-r 16 --steps 5 --warmup 2 2>/dev/null | tail -1
  done
  bash .refstack/run_unsloth.sh 2>&1 | grep -E '^\{|failed' ;;
seeds)
  for a in smollm2-135m:4 llama-3.2-1b:4 llama-2-7b:2 llama-3.1-8b:2; do
    $Q bench --device cuda --arch ${a%:*} --batch ${a#*:} --seq 2048 --lora-r 16 --steps 5 --warmup 2 2>/dev/null | tail -1
  done
  python3 -m zipfile -e .refstack/bitsandbytes-0.50.2-cuda130-slim.zip /tmp/bnb
  PYTHONPATH=/tmp/bnb PYTHONUNBUFFERED=1 python3 .refstack/reference_qlora.py smollm2-135m,llama-3.2-1b,llama-2-7b,llama-3.1-8b 2>&1 | grep -E '^\{|rror' ;;
esac
