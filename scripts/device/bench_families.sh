#!/usr/bin/env bash
# Issue 10's family shapes on the GPU: for each, `qlora bench` and then the seeds' stack (transformers + PEFT +
# bitsandbytes, scripts/device/reference_qlora_families.py) on the same shape, in one device call so that the ratios
# compare like with like; a table of tokens/s and peak memory at the end. Both: random weights, NF4 + double quant,
# LoRA r=16 alpha 32 dropout 0 on every projection, gradient checkpointing, 2 warm-up and 5 timed steps.
# Usage, from the repository root on the GPU machine, with ../shared/bench copied to .refstack
# (`carry: [".refstack", "<the binary's folder>"]`):
#   scripts/device/bench_families.sh path/to/qlora [ARCH ...]     (default: qwen3-8b gemma-2-9b gemma-3-12b phi-4-mini)
# Name fewer shapes to split the work over two calls if one would pass the 10-minute limit.
set -u
Q=${1:?usage: scripts/device/bench_families.sh path/to/qlora [ARCH ...]}
shift
ARCHS=("$@")
[ ${#ARCHS[@]} -eq 0 ] && ARCHS=(qwen3-8b gemma-2-9b gemma-3-12b phi-4-mini)
# Rows per step, as reference_qlora_families.py's table has them (DESIGN.md's 8B class: 2 x 2048).
declare -A BATCH=([qwen3-8b]=2 [gemma-2-9b]=2 [gemma-3-12b]=2 [phi-4-mini]=2)
SEQ=2048
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(mktemp -d)
[ -d /tmp/bnb/bitsandbytes ] || python3 -m zipfile -e .refstack/bitsandbytes-0.50.2-cuda130-slim.zip /tmp/bnb
PYTHONPATH=/tmp/bnb python3 -c "import torch, transformers, peft, bitsandbytes as b; print('seeds\' stack: torch', torch.__version__,
  'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)" >&2
for a in "${ARCHS[@]}"; do
  b=${BATCH[$a]:-}
  [ -n "$b" ] || { echo "unknown shape '$a' (known: ${!BATCH[*]})" >&2; exit 2; }
  echo "== $a, $b x $SEQ: qlora bench" >&2
  start=$SECONDS
  "$Q" bench --device cuda --arch "$a" --batch "$b" --seq $SEQ --lora-r 16 --steps 5 --warmup 2 >"$OUT/$a.ours" 2>"$OUT/$a.ours.err"
  echo "   rc $?, $((SECONDS - start)) s: $(tail -1 "$OUT/$a.ours")" >&2
  [ -s "$OUT/$a.ours" ] || tail -3 "$OUT/$a.ours.err" >&2
  echo "== $a, $b x $SEQ: seeds' stack" >&2
  start=$SECONDS
  PYTHONPATH=/tmp/bnb PYTHONUNBUFFERED=1 python3 "$HERE/reference_qlora_families.py" "$a" >"$OUT/$a.ref" 2>"$OUT/$a.ref.err"
  echo "   rc $?, $((SECONDS - start)) s: $(tail -1 "$OUT/$a.ref")" >&2
  [ -s "$OUT/$a.ref" ] || tail -5 "$OUT/$a.ref.err" >&2
done
SHAPES=()
for a in "${ARCHS[@]}"; do SHAPES+=("$a:${BATCH[$a]}:$SEQ"); done
python3 - "$OUT" "${SHAPES[@]}" <<'EOF'
import json, sys

out = sys.argv[1]
shapes = {a: f"{b} × {s}" for a, b, s in (x.split(":") for x in sys.argv[2:])}
archs = list(shapes)


def last_json(path):
    """The last JSON line of a file, or the last line of its .err as an error."""
    try:
        for line in reversed(open(path).read().splitlines()):
            if line.startswith("{"):
                return json.loads(line)
    except OSError:
        pass
    try:
        err = [l for l in open(path + ".err").read().splitlines() if l.strip()]
    except OSError:
        err = []
    return {"error": err[-1] if err else "no output"}


def cell(r, key, fmt):
    return fmt.format(r[key]) if key in r else "—"


print("\n| workload | batch × seq | ours tok/s | ours peak GiB | seeds' stack tok/s | its peak GiB (reserved) | speed ratio | memory ratio |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
errors, device = [], None
for a in archs:
    ours, ref = last_json(f"{out}/{a}.ours"), last_json(f"{out}/{a}.ref")
    try:
        for line in open(f"{out}/{a}.ref").read().splitlines():
            if '"ceiling_bf16_tflops"' in line:
                device = json.loads(line)
    except OSError:
        pass
    for who, r in (("ours", ours), ("seeds' stack", ref)):
        if "error" in r:
            errors.append(f"{a}, {who}: {r['error']}")
    shape = shapes[a]
    speed = f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if "tokens_per_s" in ours and "tokens_per_s" in ref else "—"
    memory = f"{ours['peak_alloc_gib'] / ref['peak_alloc_gib']:.2f}×" if "peak_alloc_gib" in ours and "peak_alloc_gib" in ref else "—"
    reserved = f" ({ref['peak_reserved_gib']:.2f})" if "peak_reserved_gib" in ref else ""
    print(f"| {a} | {shape} | {cell(ours, 'tokens_per_s', '{:,.0f}')} | {cell(ours, 'peak_alloc_gib', '{:.2f}')} | "
          f"{cell(ref, 'tokens_per_s', '{:,.0f}')} | {cell(ref, 'peak_alloc_gib', '{:.2f}')}{reserved} | {speed} | {memory} |")
if device:
    print(f"\nseeds' stack device: {device.get('device')}, bf16 matmul ceiling {device.get('ceiling_bf16_tflops')} TFLOP/s")
for a in archs:
    ours, ref = last_json(f"{out}/{a}.ours"), last_json(f"{out}/{a}.ref")
    if "useful_tflops" in ours or "useful_tflops" in ref:
        print(f"{a}: useful TFLOP/s ours {ours.get('useful_tflops', '—')} (reference formula {ours.get('useful_tflops_ref_formula', '—')}), "
              f"seeds' stack {ref.get('useful_tflops', '—')}; loss ours {ours.get('loss_last', '—')}, seeds' {ref.get('loss', '—')}")
for e in errors:
    print("error:", e[:400])
EOF
