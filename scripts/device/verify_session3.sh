#!/usr/bin/env bash
# Session 3's verification on the lent GPU machine, from the repository root: the GPU check on every kernel target,
# the reliability behaviour of `qlora train` on the GPU (pre-tokenized data without a tokenizer, kill -9 and
# --resume to the same losses, an earlier run refused), and the bench workloads after the release build
# kept Swift's bounds checks on; `qlora` is the one pip installed from the wheel (scripts/build_wheel.sh).
# Usage: scripts/device/verify_session3.sh WHEEL GPU_CHECK
WHEEL=$1; G=$2
step() { echo; echo "### $*"; }
step "the wheel: pip install into a fresh virtual environment (no Swift on this machine)"
rm -rf /tmp/wv; python3 -m venv /tmp/wv && /tmp/wv/bin/pip install -q --no-index "$WHEEL" && /tmp/wv/bin/qlora --version
Q=/tmp/wv/bin/qlora; B=$(dirname $G)
step "GPU check on sm_90a and compute_80/86/89"
scripts/device/check_targets.sh $G

step "train on the GPU: tiny fixture, pre-tokenized data, no tokenizer.json"
W=/tmp/v3; rm -rf $W; mkdir -p $W
python3 - <<'PY'
import json, random
random.seed(3)
with open("/tmp/v3/data.jsonl", "w") as f:
    for i in range(64):
        ids = [random.randrange(1000) for _ in range(48)]
        f.write(json.dumps({"input_ids": ids}) + ("\r\n" if i % 2 else "\n"))
PY
M=Tests/Fixtures/tiny-llama/base
common="--model $M --data $W/data.jsonl --max-steps 40 --save-steps 5 --batch-size 4 --max-seq-length 64 --device cuda --seed 7"
$Q train $common --output $W/full > $W/full.log 2>&1; grep -E "device|trained|Error" $W/full.log | head -3
$Q train $common --output $W/killed > $W/k1.log 2>&1 &
pid=$!; for i in $(seq 400); do [ -d $W/killed/checkpoint-15 ] && break; sleep 0.05; done
kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
echo "killed after: $(ls $W/killed | grep checkpoint | tr '\n' ' ')"
$Q train $common --output $W/killed > $W/again.log 2>&1; echo "rerun without --resume: $(grep -m1 Error $W/again.log | cut -c1-160)"
$Q train $common --output $W/killed --resume > $W/k2.log 2>&1; grep -E "resumed|trained|Error" $W/k2.log | head -3
python3 - <<'PY'
import json
def steps(p):
    return [(d["step"], d["loss"]) for d in map(json.loads, open(p)) if "loss" in d]
a, b = steps("/tmp/v3/full/metrics.jsonl"), steps("/tmp/v3/killed/metrics.jsonl")
print("metrics steps once:", [s for s, _ in b] == sorted(set(s for s, _ in b)), "| same steps:", [s for s, _ in a] == [s for s, _ in b],
      "| worst loss difference:", max(abs(x[1] - y[1]) for x, y in zip(a, b)))
PY
cmp $W/full/adapter_model.safetensors $W/killed/adapter_model.safetensors && echo "adapters identical" || echo "adapters differ (GPU atomics: see the losses)"
$Q eval --model $M --adapter $W/full --data $W/data.jsonl --device cuda --json 2>&1 | tail -1

step "bench after keeping Swift's checks on (release -O)"
for w in "llama-3.2-1b 4" "llama-3.1-8b 2"; do set -- $w
  $Q bench --device cuda --arch $1 --batch $2 --seq 2048 --lora-r 16 --steps 5 2>/dev/null | tail -1
done
