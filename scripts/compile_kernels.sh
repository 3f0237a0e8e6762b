#!/usr/bin/env bash
# Compiles every CUDA kernel, with the options the backend uses, for every architecture we ship for: cubins for
# Ampere (sm_80, sm_86), Ada (sm_89) and Hopper (sm_90a), and the portable PTX for compute_80/86/89.
# Turing (sm_75) is not in the list yet: attention_mma.cu's bf16 mma and cp.async need sm_80, and a T4 needs the
# fp16 compute path (issue 15); `scripts/compile_kernels.sh sm_75` shows where it stands.
# Needs no GPU: NVRTC alone (from the PyPI wheel nvidia-cuda-nvrtc, downloaded once into .build/nvrtc).
# Usage: scripts/compile_kernels.sh [TARGETS]   (default: all of the above; about 45 s a target on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS=${1:-sm_80,sm_86,sm_89,sm_90a,compute_80,compute_86,compute_89}
NVRTC_DIR=.build/nvrtc
if [ ! -e "$NVRTC_DIR/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  mkdir -p "$NVRTC_DIR"
  python3 -m pip download -q --no-deps -d "$NVRTC_DIR" "nvidia-cuda-nvrtc==13.0.*"
  (cd "$NVRTC_DIR" && python3 -m zipfile -e nvidia_cuda_nvrtc-*.whl .)
fi
swift build -c release --product qlora-gpu-check
LD_LIBRARY_PATH="$PWD/$NVRTC_DIR/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  .build/release/qlora-gpu-check --compile-only "$TARGETS"
