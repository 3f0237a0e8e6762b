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
