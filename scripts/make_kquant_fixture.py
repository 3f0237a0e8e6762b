#!/usr/bin/env python3
"""Writes Tests/Fixtures/gguf/kquant-blocks.gguf: fixed rows of 256 values and what ggml's own quantizer makes of them
in Q4_K, Q5_K and Q6_K. The quantizer is libggml-base's `ggml_quantize_chunk` (what llama-quantize runs; without an
importance matrix it is `quantize_row_q4_K_ref` / `_q5_K_ref` / `_q6_K_ref`), built from llama.cpp's source (see
scripts/build_llamacpp.sh). Tensors: "input" (F32, [256, rows]) and "Q4_K", "Q5_K", "Q6_K" (those types, same shape).

The rows cover the quantizers' branches: ordinary and weight-like values, all positive (the minimum clipped to 0),
all negative, all zero, a constant row, a zero sub-block, values so small that the f16 scales are subnormal, large
values, sub-blocks on scales so different that some 6-bit scales round to 0, values on a grid (rounding ties), an
outlier, and bf16-rounded weights as exports quantize them.

Usage: LIBGGML=.build/llama.cpp/bin/libggml-base.so python3 scripts/make_kquant_fixture.py OUT.gguf
       (needs numpy and the gguf package)
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

rng = np.random.default_rng(2026)


def bf16_round(a):
    u = a.astype(np.float32).view(np.uint32)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


rows = [
    rng.normal(0, 1, 256),
    rng.normal(0, 0.02, 256) * (1 + 3 * (rng.random(256) < 0.02)),
    rng.uniform(0.1, 1, 256),
    -rng.uniform(0.1, 1, 256),
    np.zeros(256),
    np.full(256, 0.5),
    np.concatenate([rng.normal(0, 1, 64), np.zeros(32), rng.normal(0, 1, 160)]),
    rng.normal(0, 1e-6, 256),
    rng.normal(0, 1e3, 256),
    np.concatenate([rng.normal(0, s, 32) for s in (1, 1e-4, 0.5, 1e-3, 0.02, 1e-5, 0.2, 0.004)]),
    bf16_round(rng.normal(0, 0.05, 256)),
    rng.integers(-64, 64, 256) / 8.0,
    np.concatenate([rng.normal(0, 0.01, 100), [100.0], rng.normal(0, 0.01, 155)]),
    rng.integers(-8, 8, 256).astype(np.float64),
    np.abs(rng.normal(0, 1, 256)) + 2.0,
    bf16_round(rng.standard_t(3, 256) * 0.03),
]
x = np.ascontiguousarray(np.stack(rows).astype(np.float32))

w = gguf.GGUFWriter(sys.argv[1], arch="test")
w.add_tensor("input", x)
for qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K, gguf.GGMLQuantizationType.Q6_K):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((x.shape[0], 256 // block * size), dtype=np.uint8)
    lib.ggml_quantize_init(int(qtype))
    n = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], 256, None)
    assert n == out.size, (qtype, n, out.size)
    w.add_tensor(qtype.name, out, raw_shape=out.shape, raw_dtype=qtype)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
