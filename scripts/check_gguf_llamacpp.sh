#!/bin/sh
# llama.cpp itself checks `qlora export --format gguf` (not part of the test suite: building llama.cpp takes minutes).
#
# 1. Gets llama.cpp, one of two ways:
#    - LLAMA_CPP_SOURCE=<a llama.cpp source tree> (e.g. vendor/llama.cpp of the llama-cpp-python sdist): builds
#      libllama with cmake (CPU) into .build/llamacpp-build and the small C program scripts/gguf_llamacpp_logits.c
#      against it; no network needed.
#    - otherwise: installs llama-cpp-python (which builds llama.cpp from source; needs a C++ compiler, pip fetches cmake)
#      into .build/llamacpp, unless `import llama_cpp` already works there or LLAMA_CPP_PYTHONPATH names a folder with it.
# 2. Exports the tiny fixture (tiny-llama/base with the sentencepiece-bpe/legacy tokenizer) with its adapter as
#    f16, bf16, q8_0 and q4_0, and without it as f16, with the release `qlora` binary.
# 3. Runs every file in llama.cpp and compares its logits with transformers' logits of the same model
#    (scripts/check_gguf_llamacpp.py): f16/bf16 within bf16 rounding (relative error ≤ 1e-2), q8_0 ≤ 3e-2 with
#    the same greedy tokens, q4_0 reported only.
#
# 4. With LLAMA_CPP_SOURCE: every quantized tensor of our q8_0, q4_0 and q6_k exports (of the tiny base, and of a
#    synthetic model with rows of 256 so that Q6_K is used) is compared byte for byte with what libggml's
#    ggml_quantize_chunk (llama-quantize's quantizer) makes of the same values (scripts/check_ggml_quantizers.py;
#    needs the gguf package, e.g. .build/pydeps from the test suite).
#
# Usage: [LLAMA_CPP_SOURCE=DIR] scripts/check_gguf_llamacpp.sh   (after `swift build -c release`)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
qlora=${QLORA:-$root/.build/release/qlora}
deps=${LLAMA_CPP_PYTHONPATH:-$root/.build/llamacpp}
if [ -n "${LLAMA_CPP_SOURCE:-}" ]; then
    build=$root/.build/llamacpp-build
    if [ ! -f "$build/bin/libllama.so" ]; then
        cmake -S "$LLAMA_CPP_SOURCE" -B "$build" -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
            -DCMAKE_BUILD_TYPE=Release >&2
        cmake --build "$build" -j "$(nproc)" >&2
    fi
    cc -O2 "$root/scripts/gguf_llamacpp_logits.c" -I "$LLAMA_CPP_SOURCE/include" -I "$LLAMA_CPP_SOURCE/ggml/include" \
        -L "$build/bin" -lllama -lggml -lggml-base -o "$build/gguf_llamacpp_logits"
    export LD_LIBRARY_PATH="$build/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LLAMA_LOGITS="$build/gguf_llamacpp_logits"
elif ! PYTHONPATH="$deps" python3 -c "import llama_cpp" 2>/dev/null; then
    echo "installing llama-cpp-python into $deps (builds llama.cpp; this takes minutes)" >&2
    CMAKE_ARGS="-DGGML_NATIVE=OFF" python3 -m pip install --quiet --target "$deps" llama-cpp-python numpy
fi
work=$(mktemp -d)
model=$work/tiny-llama
mkdir -p "$model"
cp "$root"/Tests/Fixtures/tiny-llama/base/config.json "$root"/Tests/Fixtures/tiny-llama/base/model.safetensors "$model"/
cp "$root"/Tests/Fixtures/sentencepiece-bpe/legacy/tokenizer.json "$root"/Tests/Fixtures/sentencepiece-bpe/legacy/tokenizer_config.json "$model"/
for t in f16 bf16 q8_0 q4_0; do
    "$qlora" export --model "$model" --adapter "$root/Tests/Fixtures/tiny-llama/adapter" --type $t --out "$work/tiny-$t.gguf" >&2
done
"$qlora" export --model "$model" --type f16 --out "$work/tiny-base-f16.gguf" >&2
PYTHONPATH="$deps" python3 "$root/scripts/check_gguf_llamacpp.py" "$root/Tests/Fixtures" \
    "$work/tiny-f16.gguf:1e-2" "$work/tiny-bf16.gguf:1e-2" "$work/tiny-q8_0.gguf:3e-2" "$work/tiny-q4_0.gguf" \
    "$work/tiny-base-f16.gguf:1e-2:logits_bf16base_fp32"
if [ -n "${LLAMA_CPP_SOURCE:-}" ]; then
    python3 "$root/scripts/make_synthetic_llama.py" "$work/syn"
    for t in bf16 q8_0 q4_0 q6_k; do
        "$qlora" export --model "$model" --type $t --out "$work/base-$t.gguf" >&2
        "$qlora" export --model "$work/syn" --type $t --out "$work/syn-$t.gguf" >&2
    done
    gguf=${GGUF_PYTHONPATH:-$root/.build/pydeps}
    LIBGGML="$build/bin/libggml-base.so" PYTHONPATH="$gguf" python3 "$root/scripts/check_ggml_quantizers.py" \
        "$work/base-bf16.gguf" "$work/base-q8_0.gguf" "$work/base-q4_0.gguf" "$work/base-q6_k.gguf"
    LIBGGML="$build/bin/libggml-base.so" PYTHONPATH="$gguf" python3 "$root/scripts/check_ggml_quantizers.py" \
        "$work/syn-bf16.gguf" "$work/syn-q8_0.gguf" "$work/syn-q4_0.gguf" "$work/syn-q6_k.gguf"
fi
rm -rf "$work"
