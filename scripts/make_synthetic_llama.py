#!/usr/bin/env python3
"""Writes a small random Llama folder whose rows are multiples of 256 (by default hidden 256, intermediate 512, one
layer, 4 heads and 2 key/value heads, vocab 300, bf16 weights, a plain byte-level tokenizer), so that GGUF exports of
it use Q4_K, Q5_K and Q6_K where llama.cpp's tools do. Used by scripts/check_gguf_llamacpp.py.
Usage: python3 scripts/make_synthetic_llama.py OUT_DIR [LAYERS HIDDEN INTERMEDIATE HEADS KV_HEADS TIED(0/1)]"""
import json
import os
import struct
import sys

import numpy as np

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(7)
L, H, I, NH, NKV, TIED = (int(a) for a in (sys.argv[2:] or [1, 256, 512, 4, 2, 0]))
V = 300
KV = H // NH * NKV
config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
          "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NKV, "vocab_size": V,
          "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": bool(TIED),
          "bos_token_id": 1, "eos_token_id": 2}
json.dump(config, open(os.path.join(out, "config.json"), "w"))


def bf16(a):
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
if not TIED:
    shapes["lm_head.weight"] = (V, H)
for l in range(L):
    p = f"model.layers.{l}."
    shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (KV, H),
                   p + "self_attn.v_proj.weight": (KV, H), p + "self_attn.o_proj.weight": (H, H),
                   p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I)})
header, blobs, offset = {}, [], 0
for name, shape in sorted(shapes.items()):
    # Normal weights with 1% outliers four times larger; norms around 1.
    a = 1 + 0.1 * rng.normal(size=shape) if len(shape) == 1 else rng.normal(0, 0.02, shape) * (1 + 3 * (rng.random(shape) < 0.01))
    b = bf16(a).tobytes()
    header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + len(b)]}
    blobs.append(b)
    offset += len(b)
h = json.dumps(header).encode()
h += b" " * ((8 - len(h) % 8) % 8)
open(os.path.join(out, "model.safetensors"), "wb").write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
specials = [{"id": i, "content": c, "special": True, "normalized": False} for i, c in enumerate(["<unk>", "<s>", "</s>"])]
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, V)}}
tokenizer = {"version": "1.0", "added_tokens": specials, "normalizer": None,
             "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
             "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
             "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
                       "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": []}}
json.dump(tokenizer, open(os.path.join(out, "tokenizer.json"), "w"))
json.dump({"bos_token": "<s>", "eos_token": "</s>"}, open(os.path.join(out, "tokenizer_config.json"), "w"))
