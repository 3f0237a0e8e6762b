#!/usr/bin/env bash
# The wheel as a user gets it: builds it (scripts/build_wheel.sh), installs it with pip into a fresh virtual
# environment, and runs the installed `qlora` from there: --version, then a short CPU training on the tiny fixture model
# (pre-tokenized data, so no tokenizer is needed), with TensorBoard event files. auditwheel (from PyPI, installed into
# the same environment) then checks that the binary keeps to the wheel's manylinux tag; without network that check is
# skipped, saying so. Exits non-zero at the first failure.
#
# Usage: scripts/check_wheel.sh [WHEEL]     (given a wheel, it is checked without building)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
fail() { echo "check_wheel.sh: FAILED: $*" >&2; exit 1; }

if [ $# -ge 1 ]; then wheel=$1; else wheel=$(scripts/build_wheel.sh | tail -1); fi
[ -f "$wheel" ] || fail "no wheel at '$wheel'"
echo "== wheel: $wheel ($(du -h "$wheel" | cut -f1))"
python3 -m zipfile -l "$wheel"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel" || fail "pip install $wheel"
qlora="$work/venv/bin/qlora"
[ -x "$qlora" ] || fail "pip installed no executable $qlora"
echo "== installed: $qlora"

echo "== qlora --version"
# Run from elsewhere, with no Swift in PATH, as on a machine without a toolchain.
clean_path="$work/venv/bin:/usr/bin:/bin"
version_line=$(cd "$work" && env -i PATH="$clean_path" HOME="$work" qlora --version) || fail "qlora --version"
echo "$version_line"
expected_version=$(sed -n 's/^ *public static let version = "\([^"]*\)"$/\1/p' Sources/QLoRA/Support/Version.swift)
case "$version_line" in
    "qlora $expected_version (commit "*")") ;;
    *) fail "--version printed '$version_line', expected 'qlora $expected_version (commit ...)'" ;;
esac
case "$version_line" in *"(commit unknown)"*) fail "the wheel's binary does not know its git commit" ;; esac

echo "== qlora train (CPU, tiny fixture, 2 steps)"
data="$work/data.jsonl"
for i in 1 2 3 4 5 6 7 8; do
    echo "{\"input_ids\": [1, $((100 + i)), $((200 + i)), $((300 + i)), $((400 + i)), $((500 + i)), 2]}" >> "$data"
done
(cd "$work" && env -i PATH="$clean_path" HOME="$work" qlora train --model "$root/Tests/Fixtures/tiny-llama/base" \
    --data "$data" --max-steps 2 --batch-size 2 --lora-r 4 --logging-steps 1 --device cpu --output "$work/run" \
    --report-to tensorboard,jsonl) || fail "qlora train"
for file in adapter_model.safetensors adapter_config.json metrics.jsonl; do
    [ -s "$work/run/$file" ] || fail "the training wrote no $file"
done
ls "$work/run/runs/"events.out.tfevents.* > /dev/null 2>&1 || fail "the training wrote no TensorBoard event file in $work/run/runs"
echo "metrics.jsonl:"
cat "$work/run/metrics.jsonl"
echo "event files: $(cd "$work/run/runs" && ls)"

echo "== auditwheel show"
if "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check auditwheel 2> "$work/pip.log"; then
    report=$("$work/venv/bin/auditwheel" show "$wheel" 2>&1) || fail "auditwheel show: $report"
    echo "$report"
    tag=$(basename "$wheel" .whl); tag=${tag##*-}
    consistent=$(echo "$report" | tr -s ' \n' ' ' | grep -o 'consistent with the following platform tag: "[^"]*"' | sed 's/.*"\(.*\)"/\1/')
    [ "$consistent" = "$tag" ] || fail "the wheel is tagged $tag but auditwheel finds it consistent with '$consistent'"
else
    echo "auditwheel skipped: pip could not install it (no network?): $(tail -1 "$work/pip.log")"
fi
echo "== check_wheel.sh: all checks passed"
