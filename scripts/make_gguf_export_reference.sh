#!/bin/sh
# Remakes Tests/Fixtures/gguf/tiny-llama-llamacpp-{f16,q8_0}.json: what llama.cpp's own converter
# (convert_hf_to_gguf.py) writes for the tiny-llama fixture with the sentencepiece-bpe/legacy tokenizer and the
# Llama 2 chat template: metadata keys, value types and short values, tensor names, types and shapes
# (summarised by scripts/gguf_py_summary.py, without the sums). GGUFExportTests compares our export with it.
#
# Usage: scripts/make_gguf_export_reference.sh LLAMA_CPP_SOURCE PYTHONPATH_WITH_TORCH_TRANSFORMERS
#   LLAMA_CPP_SOURCE: a llama.cpp checkout (e.g. vendor/llama.cpp of the llama-cpp-python sdist, 0.3.36 was used)
#   the Python path must hold torch (CPU), transformers and numpy; the converter's own gguf-py is used.
set -eu
src=$1
deps=$2
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
model=$work/tiny-llama
mkdir -p "$model"
cp "$root"/Tests/Fixtures/tiny-llama/base/config.json "$root"/Tests/Fixtures/tiny-llama/base/generation_config.json \
   "$root"/Tests/Fixtures/tiny-llama/base/model.safetensors "$model"/
cp "$root"/Tests/Fixtures/sentencepiece-bpe/legacy/tokenizer.json "$root"/Tests/Fixtures/sentencepiece-bpe/legacy/tokenizer_config.json "$model"/
cp "$root"/Tests/Fixtures/chat-templates/llama-2.jinja "$model"/chat_template.jinja
for t in f16 q8_0; do
    PYTHONPATH="$deps:$src/gguf-py" python3 "$src"/convert_hf_to_gguf.py "$model" --outtype $t --outfile "$work/ref-$t.gguf" >/dev/null 2>&1
    PYTHONPATH="$src/gguf-py" python3 "$root"/scripts/gguf_py_summary.py "$work/ref-$t.gguf" | python3 -c '
import json, sys
s = json.loads(sys.stdin.read())
s.pop("file")
for t in s["tensors"]:
    t.pop("sum"); t.pop("sumsq")
print(json.dumps(s, indent=1, sort_keys=False))' > "$root/Tests/Fixtures/gguf/tiny-llama-llamacpp-$t.json"
done
rm -rf "$work"
