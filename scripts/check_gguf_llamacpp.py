#!/usr/bin/env python3
"""llama.cpp judges our GGUF export: runs the GGUF files given on the command line in llama.cpp and compares
llama.cpp's logits for the tiny fixture's first input row with the reference logits transformers computed for the same
merged model (Tests/Fixtures/tiny-llama/expected.safetensors, `logits_bf16base_lora`, which our own forward matches
within 1e-4). Prints one line per file: relative error of the logits and how many greedy (argmax) tokens agree.

llama.cpp runs either through llama-cpp-python (`import llama_cpp`) or, when LLAMA_LOGITS names it, through the small
C program scripts/gguf_llamacpp_logits.c built against libllama.

Usage: python3 scripts/check_gguf_llamacpp.py FIXTURES_DIR FILE.gguf[:max_rel_error[:reference]]...
  reference: the logits in expected.safetensors to compare with (default logits_bf16base_lora, the model with the
  adapter merged; logits_bf16base_fp32 for an export of the base alone).
"""
import json
import struct
import sys

import os
import subprocess
import tempfile

import numpy as np


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = {"F32": np.float32, "I64": np.int64}[info["dtype"]]
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
    return out


def llama_cpp_logits(path, ids, vocab):
    """llama.cpp's logits at every position of `ids`, [len(ids), vocab]."""
    helper = os.environ.get("LLAMA_LOGITS")
    if helper:
        with tempfile.NamedTemporaryFile(suffix=".f32") as out:
            subprocess.run([helper, path, out.name] + [str(t) for t in ids], check=True)
            return np.fromfile(out.name, dtype=np.float32).reshape(len(ids), -1)[:, :vocab].astype(np.float64)
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def main():
    fixtures = sys.argv[1]
    expected = read_safetensors(fixtures + "/tiny-llama/expected.safetensors")
    ids = [int(t) for t in expected["input_ids"][0]]
    failed = False
    for arg in sys.argv[2:]:
        path, _, rest = arg.partition(":")
        limit, _, key = rest.partition(":")
        reference = expected[key or "logits_bf16base_lora"][0].astype(np.float64)
        logits = llama_cpp_logits(path, ids, reference.shape[-1])
        rel = float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))
        agree = int((logits.argmax(-1) == reference.argmax(-1)).sum())
        ok = rel <= float(limit) if limit else True
        failed |= not ok
        print(f"{path}: logits relative error {rel:.2e} vs transformers' {key or 'logits_bf16base_lora'} (limit {limit or 'none'}), "
              f"greedy tokens agree {agree}/{len(ids)} {'ok' if ok else 'FAILED'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
