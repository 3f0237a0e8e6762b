# Sourced by the verify scripts: DIR=$1 holds qlora and qlora-gpu-check, xz'd or not (as they travel to the GPU
# machine); unpacks them, sets Q and C, names the card, and defines `step` (a heading in the output).
DIR=$1; PART=$2
for f in qlora qlora-gpu-check; do
  [ -e "$DIR/$f" ] || { [ -e "$DIR/$f.xz" ] && xz -dk "$DIR/$f.xz"; }
  [ -e "$DIR/$f" ] && chmod +x "$DIR/$f"
done
Q=$DIR/qlora; C=$DIR/qlora-gpu-check
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step() { echo; echo "### $*"; }
# The GPU check without benchmarks into $OUT/check.txt: its failures and summary.
gpu_check() {
  step "qlora-gpu-check --no-bench"
  (time $C --no-bench) > $OUT/check.txt 2>&1
  grep -E "FAIL|rror" $OUT/check.txt | head -60; grep -E "passed, " $OUT/check.txt; tail -3 $OUT/check.txt
}
# fp16, then compute_86 PTX, of the groups in $CHECK_GROUPS (comma-separated; not GROUPS, which bash keeps for the user's group ids and ignores assignments to).
gpu_check_changed() {
  step "fp16: $CHECK_GROUPS"
  $C --no-bench --compute-dtype fp16 --only "$CHECK_GROUPS" > $OUT/fp16.txt 2>&1; grep -E "FAIL|passed, " $OUT/fp16.txt | head -30
  step "compute_86 (bf16): $CHECK_GROUPS"
  $C --no-bench --arch compute_86 --only "$CHECK_GROUPS" > $OUT/c86.txt 2>&1; grep -E "FAIL|passed, " $OUT/c86.txt | head -30
}
