#!/usr/bin/env python3
"""Make the tiny Qwen3, Gemma 2, Gemma 3 and Phi-3 models of Tests/Fixtures/gguf-families/ and what llama.cpp's own
converter writes for them.

For each family a tiny random model is made with transformers (config.json + model.safetensors in bf16; every
variation the GGUF conversion treats specially is present: Qwen3's q/k norms and a head_dim unlike hidden/heads,
Gemma's (1+w) norms with the sandwich norms, soft-capping and sliding window, Gemma 3's per-layer-type RoPE with
linear scaling on the global layers, Phi-3's fused qkv/gate_up, partial rotary and longrope short/long factors;
norm weights perturbed so that a missing +1 shows). Then llama.cpp's `convert_hf_to_gguf.py` (as vendored in
llama-cpp-python 0.3.36) converts each to f16 and `<family>-llamacpp-f16.json` records what it wrote: every
metadata key with its value type and value (arrays as element type and count), every tensor's name, type and ggml
shape, and the sum and sum of squares of its values. The tokenizer is left out (the converter's `set_vocab` is
skipped): these files check the model part; the tokenizer metadata is GGUFTokenizerExport's and tested apart.

Usage: PYTHONPATH=<llama.cpp>/gguf-py python3 scripts/make_gguf_family_fixtures.py LLAMA_CPP_SOURCE
  (needs torch, transformers 5, safetensors, numpy; LLAMA_CPP_SOURCE e.g. vendor/llama.cpp of the sdist)
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers

OUT = "Tests/Fixtures/gguf-families"


def configs():
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, max_position_embeddings=256)
    return {
        "qwen3": transformers.Qwen3Config(
            **common, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            bos_token_id=1, eos_token_id=2, architectures=["Qwen3ForCausalLM"]),
        "gemma2": transformers.Gemma2Config(
            **common, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            query_pre_attn_scalar=16, sliding_window=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
            rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0, architectures=["Gemma2ForCausalLM"]),
        "gemma3": transformers.Gemma3TextConfig(
            **common, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            query_pre_attn_scalar=16, sliding_window=16, rms_norm_eps=1e-6,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            bos_token_id=2, eos_token_id=1, pad_token_id=0, architectures=["Gemma3ForCausalLM"]),
        "phi3": transformers.Phi3Config(
            **common, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.75,
            original_max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                             "short_factor": [1.0 + 0.1 * i for i in range(3)],
                             "long_factor": [2.0 + 0.5 * i for i in range(3)]},
            bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=["Phi3ForCausalLM"]),
    }


def make_model(family, config):
    torch.manual_seed({"qwen3": 1, "gemma2": 2, "gemma3": 3, "phi3": 4}[family])
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if family.startswith("gemma") else 1.0))
            else:
                p.copy_(torch.randn_like(p) * 0.5)
    model = model.to(torch.bfloat16)
    folder = os.path.join(OUT, family)
    model.save_pretrained(folder)
    write_tokenizer(folder, config.vocab_size)
    return folder


def write_tokenizer(folder, size):
    """A SentencePiece-style BPE (Gemma's layout: ▁ for spaces, byte fallback) of exactly `size` tokens, so that the
    converter's vocabulary count (Gemma 3 trims the embedding to it) and ours agree with the model's rows."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [str(d) for d in range(10)]
    pieces += [f"<0x{b:02X}>" for b in range(size - len(pieces))]
    assert len(pieces) == size
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, f, indent=1)


CONVERT = """
import sys
sys.argv = ["convert_hf_to_gguf.py", sys.argv[1], "--outtype", "f16", "--outfile", sys.argv[2]]
sys.path.insert(0, {src!r})
import convert_hf_to_gguf as c
lookup = c.get_model_class
def without_vocab(*args, **kwargs):
    model_class = lookup(*args, **kwargs)
    model_class.set_vocab = lambda self: None
    return model_class
c.get_model_class = without_vocab
c.main()
"""


def summarize(path):
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(path)
    keys = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        types = field.types
        if types[0] == gguf.GGUFValueType.ARRAY:
            values = [float(np.float32(v)) if isinstance(v, float) else v for v in field.contents()]
            value = {"array_of": types[-1].name, "count": len(field.data), "values": values}
        else:
            value = field.contents()
            if isinstance(value, float):
                value = float(np.float32(value))
        keys[name] = {"type": types[0].name, "value": value}
    tensors = []
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        tensors.append({"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape],
                        "sum": float(values.sum()), "sumsq": float((values * values).sum())})
    return {"keys": keys, "tensors": tensors}


def main():
    src = os.path.abspath(sys.argv[1])
    os.makedirs(OUT, exist_ok=True)
    for family, config in configs().items():
        folder = make_model(family, config)
        with tempfile.TemporaryDirectory() as work:
            out = os.path.join(work, "ref.gguf")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.path.join(src, "gguf-py"), os.environ.get("PYTHONPATH", "")]))
            subprocess.run([sys.executable, "-c", CONVERT.format(src=src), folder, out], check=True, env=env,
                           )
            with open(os.path.join(OUT, f"{family}-llamacpp-f16.json"), "w") as f:
                json.dump(summarize(out), f, indent=1)
        print("wrote", folder)


if __name__ == "__main__":
    main()
