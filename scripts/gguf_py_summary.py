#!/usr/bin/env python3
"""Reads GGUF files with the `gguf` package (gguf-py, llama.cpp's own reader) and prints, as one JSON object per file,
what it found: every metadata key with its value type and a short value, and every tensor's name, type, ggml shape
and the sum and sum of squares of its dequantized values (so that the caller can compare them with its own reader).

Usage: PYTHONPATH=<folder with gguf> python3 scripts/gguf_py_summary.py FILE.gguf...
Exits non-zero if gguf-py cannot read a file.
"""
import json
import sys

import numpy as np
import gguf


def short(field):
    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        return {"array_of": types[-1].name, "count": len(field.data)}
    value = field.contents()
    if isinstance(value, float):
        return float(np.float32(value))
    return value


def summary(path):
    reader = gguf.GGUFReader(path)
    keys = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        keys[name] = {"type": field.types[0].name, "value": short(field)}
    tensors = []
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        tensors.append({
            "name": t.name,
            "type": t.tensor_type.name,
            "shape": [int(d) for d in t.shape],
            "sum": float(values.sum()),
            "sumsq": float((values * values).sum()),
        })
    return {"file": path, "keys": keys, "tensors": tensors}


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(json.dumps(summary(path)))
