#!/bin/sh
# Builds llama.cpp on the CPU (libllama, libggml*) into .build/llama.cpp and, against it, scripts/llamacpp_judge.c,
# which scripts/check_gguf_llamacpp.py and the tests that use llama.cpp run. Takes a while (about 67 compile steps).
#
# The source: LLAMA_CPP_SOURCE=<a llama.cpp tree>, else the llama.cpp vendored in the llama-cpp-python sdist
# (0.3.36 was used), downloaded with pip into .build/llama.cpp-src. Needs a C/C++ compiler and cmake (pip installs
# cmake and ninja into .build/llama.cpp-tools when there is none). JOBS (default 2) compile jobs.
# Usage: scripts/build_llamacpp.sh
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/.build/llama.cpp
python=${PYTHON:-python3}
src=${LLAMA_CPP_SOURCE:-}
if [ -z "$src" ]; then
    src=$(ls -d "$root"/.build/llama.cpp-src/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -n 1 || true)
    if [ -z "$src" ]; then
        mkdir -p "$root/.build/llama.cpp-src"
        "$python" -m pip download "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION:-0.3.36}" --no-deps --no-binary :all: \
            --disable-pip-version-check -d "$root/.build/llama.cpp-src" >&2
        tar xzf "$root"/.build/llama.cpp-src/llama_cpp_python-*.tar.gz -C "$root/.build/llama.cpp-src"
        src=$(ls -d "$root"/.build/llama.cpp-src/llama_cpp_python-*/vendor/llama.cpp | head -n 1)
    fi
fi
if ! command -v cmake >/dev/null 2>&1; then
    "$python" -m pip install --quiet --disable-pip-version-check --target "$root/.build/llama.cpp-tools" cmake ninja >&2
    export PATH="$root/.build/llama.cpp-tools/bin:$PATH"
    export PYTHONPATH="$root/.build/llama.cpp-tools${PYTHONPATH:+:$PYTHONPATH}"
fi
generator=
command -v ninja >/dev/null 2>&1 && generator="-G Ninja"
if [ ! -f "$out/CMakeCache.txt" ]; then
    # shellcheck disable=SC2086
    cmake $generator -S "$src" -B "$out" -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_COMMON=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >&2
fi
cmake --build "$out" -j "${JOBS:-2}" --target llama ggml-cpu ggml-base >&2
cc -O2 "$root/scripts/llamacpp_judge.c" -I "$src/include" -I "$src/ggml/include" -L "$out/bin" -Wl,-rpath,"$out/bin" \
    -lllama -lggml -lggml-base -lm -o "$out/llamacpp_judge"
echo "$out/llamacpp_judge"
