#!/usr/bin/env python3
"""Checks, byte for byte, that our quantized GGUF tensors are what ggml's own quantizer makes of the same values.

Given a reference GGUF whose tensors hold exact values (a bf16 or f32 export of a model whose weights are bf16) and
exports of the same model in quantized types, each quantized tensor is recomputed by calling libggml-base's
`ggml_quantize_chunk` (what llama-quantize runs; without an importance matrix it is the `quantize_row_*_ref` code) on
the reference tensor's values, and compared with our bytes.

Usage: LIBGGML=path/libggml-base.so PYTHONPATH=<gguf-py> python3 scripts/check_ggml_quantizers.py EXACT.gguf QUANTIZED.gguf...
"""
import ctypes
import os
import sys

import numpy as np
import gguf

lib = ctypes.CDLL(os.environ["LIBGGML"])
lib.ggml_quantize_chunk.restype = ctypes.c_size_t
lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_void_p]
lib.ggml_quantize_init.argtypes = [ctypes.c_int]


def tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


exact = tensors(sys.argv[1])
failed = False
for path in sys.argv[2:]:
    counts = {}
    for name, t in tensors(path).items():
        kind = t.tensor_type
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
            continue
        src = np.ascontiguousarray(gguf.quants.dequantize(exact[name].data, exact[name].tensor_type).astype(np.float32).reshape(-1))
        n_per_row = int(t.shape[0])
        nrows = src.size // n_per_row
        ours = np.asarray(t.data).reshape(-1).view(np.uint8)
        theirs = np.zeros(ours.size, dtype=np.uint8)
        lib.ggml_quantize_init(int(kind))
        size = lib.ggml_quantize_chunk(int(kind), src.ctypes.data, theirs.ctypes.data, 0, nrows, n_per_row, None)
        same = size == ours.size and np.array_equal(ours, theirs)
        key = kind.name
        c = counts.setdefault(key, [0, 0])
        c[0] += same
        c[1] += 1
        if not same:
            failed = True
            diff = int((ours != theirs).sum()) if size == ours.size else -1
            print(f"{path}: {name} ({key}) differs from ggml in {diff} of {ours.size} bytes")
    print(f"{path}: " + ", ".join(f"{k} {v[0]}/{v[1]} tensors byte-identical to ggml_quantize_chunk" for k, v in sorted(counts.items())))
sys.exit(1 if failed else 0)
