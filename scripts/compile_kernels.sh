#!/usr/bin/env bash
# Compiles every CUDA kernel, with the options the backend uses, for every architecture we ship for: cubins for
# Turing (sm_75), Ampere (sm_80, sm_86), Ada (sm_89) and Hopper (sm_90a), and the portable PTX for
# compute_75/80/86/89; each for both 16-bit storage types (bf16, and fp16 with -DQLORA_HALF=1), Turing for fp16 only
# (it has no bf16 tensor cores: attention_mma.cu stops with an #error there). `--compute-dtype bf16|fp16` as a second
# argument compiles one type only.
# Needs no GPU: NVRTC alone (from the PyPI wheel nvidia-cuda-nvrtc, downloaded once into .build/nvrtc).
# Usage: scripts/compile_kernels.sh [TARGETS] [--compute-dtype bf16|fp16]   (about 45 s a target and type on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS=${1:-sm_75,sm_80,sm_86,sm_89,sm_90a,compute_75,compute_80,compute_86,compute_89}
shift || true
NVRTC_DIR=.build/nvrtc
if [ ! -e "$NVRTC_DIR/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  mkdir -p "$NVRTC_DIR"
  python3 -m pip download -q --no-deps -d "$NVRTC_DIR" "nvidia-cuda-nvrtc==13.0.*"
  (cd "$NVRTC_DIR" && python3 -m zipfile -e nvidia_cuda_nvrtc-*.whl .)
fi
# The test build's flags (-enable-testing), so that a build after `swift build --build-tests` reuses its objects.
swift build -c release -Xswiftc -enable-testing --product qlora-gpu-check
LD_LIBRARY_PATH="$PWD/$NVRTC_DIR/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  .build/release/qlora-gpu-check --compile-only "$TARGETS" "$@"
