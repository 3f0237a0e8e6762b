#!/usr/bin/env python3
"""llama.cpp judges `qlora export`: runs our GGUF files in llama.cpp (scripts/llamacpp_judge.c built against libllama
by scripts/build_llamacpp.sh) and compares what it computes with the reference. Prints one line per comparison and
exits non-zero if one fails its limit.

  tiny      the tiny fixture (tiny-llama/base with the sentencepiece-bpe/legacy tokenizer) and its adapter, exported
            as f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k: llama.cpp's logits for the fixture's first input row against
            transformers' logits of the merged model (Tests/Fixtures/tiny-llama/expected.safetensors, which our own
            forward matches within 1e-4): f16/bf16 relative error ≤ 1e-2, q8_0 ≤ 3e-2 with the same greedy tokens,
            the 4/5/6-bit types reported. The base alone as f16 against logits_bf16base_fp32.
  lora      the adapter as a LoRA GGUF (--format gguf-lora, f32 and f16) applied by llama.cpp over the base's f16 export
            (llama_adapter_lora_init + llama_set_adapters_lora at scale 1): its logits against transformers' merged
            model (≤ 1e-2) and against llama.cpp's own logits of our merged f16 export.
  bytes     every quantized tensor of our q8_0, q4_0, q4_k_m, q5_k_m and q6_k exports (the tiny base, and synthetic
            llamas whose rows are multiples of 256) against libggml-base's ggml_quantize_chunk of the exact values
            (scripts/check_ggml_quantizers.py), and each export's tensor types against what llama_model_quantize
            (llama-quantize) chose for our f16 export of the same model.
  smollm2   the default model (qlora fetch smollm2-135m): f16/bf16 logits of a chat prompt against transformers (fp32
            compute on the same bf16 weights), max abs and relative error; greedy tokens of the f16 and q8_0 exports
            against transformers' (Tests/Fixtures/gguf/smollm2-forward-reference.json); llama.cpp's perplexity on
            Tests/Fixtures/perplexity/essay.txt (chunks of 512) of each quantized export next to llama-quantize's
            quantization of our f16 export to the same type: ours must be within 1% of llama-quantize's.

  families  the Qwen3, Gemma 2, Gemma 3 and Phi-3 models of Tests/Fixtures/gguf-families exported as f16 and q8_0:
            llama.cpp's logits of a 32-token row (longer than the windows) against transformers' (f16 ≤ 1e-2; q8_0
            reported, and ≤ 1e-4 from llama-quantize's q8_0 of our f16 export); with the fixture's adapter merged (f16) and as a LoRA GGUF (f32, f16) applied by
            llama.cpp over the f16 base, against transformers' logits with the adapter (≤ 1e-2).

Usage: python3 scripts/check_gguf_llamacpp.py [tiny] [lora] [bytes] [smollm2] [families] [--make-type-fixture]
  Environment: QLORA (the qlora binary, default .build/release/qlora), LLAMACPP (the build folder, default
  .build/llama.cpp), GGUF_PYTHONPATH (a folder with the gguf package when the interpreter lacks it, default
  .build/pydeps). smollm2 needs torch and transformers in this interpreter, and pip (or the cache) for the model.
  --make-type-fixture rewrites Tests/Fixtures/gguf/llama-quantize-types.json from llama_model_quantize's choices.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "Tests", "Fixtures")
QLORA = os.environ.get("QLORA", os.path.join(ROOT, ".build", "release", "qlora"))
LLAMACPP = os.environ.get("LLAMACPP", os.path.join(ROOT, ".build", "llama.cpp"))
JUDGE = os.path.join(LLAMACPP, "llamacpp_judge")
sys.path.insert(0, os.environ.get("GGUF_PYTHONPATH", os.path.join(ROOT, ".build", "pydeps")))
FTYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
failed = False


def report(ok, line):
    global failed
    failed |= ok is False
    print(line + ("" if ok is None else " ok" if ok else " FAILED"), flush=True)


def run(args, **kw):
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(LLAMACPP, "bin") + ":" + os.environ.get("LD_LIBRARY_PATH", ""))
    return subprocess.run(args, check=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw).stdout


def qlora(*args):
    run([QLORA, *args])


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


def logits(path, ids, vocab, lora=None):
    with tempfile.NamedTemporaryFile(suffix=".f32") as out:
        run([JUDGE, "logits", path, out.name] + (["--lora", lora] if lora else []) + [str(t) for t in ids])
        return np.fromfile(out.name, dtype=np.float32).reshape(len(ids), -1)[:, :vocab].astype(np.float64)


def compare(name, got, reference, limit=None):
    rel = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
    max_abs = float(np.abs(got - reference).max())
    max_rel = max_abs / float(np.abs(reference).max())
    agree = int((got.argmax(-1) == reference.argmax(-1)).sum())
    report(None if limit is None else rel <= limit,
           f"{name}: relative error {rel:.2e} (limit {limit or 'none'}), max abs error {max_abs:.2e} "
           f"({max_rel:.2e} of the largest logit), greedy tokens agree {agree}/{len(reference)}")
    return agree == len(reference)


def tiny_folder(work):
    model = os.path.join(work, "tiny-llama")
    os.makedirs(model, exist_ok=True)
    for src in ("tiny-llama/base/config.json", "tiny-llama/base/model.safetensors",
                "sentencepiece-bpe/legacy/tokenizer.json", "sentencepiece-bpe/legacy/tokenizer_config.json"):
        with open(os.path.join(FIXTURES, src), "rb") as f, open(os.path.join(model, os.path.basename(src)), "wb") as g:
            g.write(f.read())
    return model


def check_tiny(work):
    model = tiny_folder(work)
    expected = read_safetensors(os.path.join(FIXTURES, "tiny-llama", "expected.safetensors"))
    ids = [int(t) for t in expected["input_ids"][0]]
    merged = expected["logits_bf16base_lora"][0].astype(np.float64)
    limits = {"f16": 1e-2, "bf16": 1e-2, "q8_0": 3e-2}
    for t in ("f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"):
        out = os.path.join(work, f"tiny-{t}.gguf")
        qlora("export", "--model", model, "--adapter", os.path.join(FIXTURES, "tiny-llama", "adapter"), "--type", t, "--out", out)
        same = compare(f"tiny {t} (adapter merged) vs transformers", logits(out, ids, merged.shape[-1]), merged, limits.get(t))
        if t == "q8_0":
            report(same, "tiny q8_0: same greedy tokens as transformers")
    base = os.path.join(work, "tiny-base-f16.gguf")
    qlora("export", "--model", model, "--type", "f16", "--out", base)
    compare("tiny base f16 vs transformers", logits(base, ids, merged.shape[-1]), expected["logits_bf16base_fp32"][0].astype(np.float64), 1e-2)


def check_lora(work):
    model = tiny_folder(work)
    expected = read_safetensors(os.path.join(FIXTURES, "tiny-llama", "expected.safetensors"))
    ids = [int(t) for t in expected["input_ids"][0]]
    merged = expected["logits_bf16base_lora"][0].astype(np.float64)
    adapter = os.path.join(FIXTURES, "tiny-llama", "adapter")
    base, merged_gguf = os.path.join(work, "lora-base-f16.gguf"), os.path.join(work, "lora-merged-f16.gguf")
    qlora("export", "--model", model, "--type", "f16", "--out", base)
    qlora("export", "--model", model, "--adapter", adapter, "--type", "f16", "--out", merged_gguf)
    ours_merged = logits(merged_gguf, ids, merged.shape[-1])
    for t in ("f32", "f16"):
        lora = os.path.join(work, f"adapter-{t}.gguf")
        qlora("export", "--model", model, "--adapter", adapter, "--format", "gguf-lora", "--type", t, "--out", lora)
        applied = logits(base, ids, merged.shape[-1], lora=lora)
        compare(f"tiny base f16 + LoRA GGUF {t} (llama.cpp --lora) vs transformers' merged model", applied, merged, 1e-2)
        compare(f"tiny base f16 + LoRA GGUF {t} vs llama.cpp on our merged f16 export", applied, ours_merged, 1e-2)
        base_only = logits(base, ids, merged.shape[-1])
        report(float(np.abs(applied - base_only).max()) > 1e-3 * float(np.abs(base_only).max()),
               f"tiny LoRA GGUF {t}: the adapter changes llama.cpp's logits (max change {float(np.abs(applied - base_only).max()):.3f})")


# The families judged: Tests/Fixtures/gguf-families/<family> (tiny models whose values llama.cpp can express) with
# <family>-adapter and <family>-judge.safetensors (scripts/make_gguf_judge_fixtures.py: transformers' logits of one
# 32-token row, base and with the adapter). Tests/Fixtures/families/ is not used: its Gemma models have
# query_pre_attn_scalar ≠ head_dim and a local RoPE base of 10, which llama.cpp's gemma2/gemma3 cannot express (it
# scales queries by 1/√head_dim and fixes the local base at 10000), and its qwen3/mistral slide windows that llama.cpp's
# qwen3/llama do not have.
JUDGED_FAMILIES = ["qwen3", "gemma2", "gemma3", "phi3"]


def check_families(work):
    for name in JUDGED_FAMILIES:
        folder = os.path.join(FIXTURES, "gguf-families", name)
        expected = read_safetensors(os.path.join(FIXTURES, "gguf-families", f"{name}-judge.safetensors"))
        ids = [int(t) for t in expected["input_ids"][0]]
        base_ref = expected["logits_base"].astype(np.float64)
        lora_ref = expected["logits_lora"].astype(np.float64)
        vocab = base_ref.shape[-1]
        adapter = os.path.join(FIXTURES, "gguf-families", f"{name}-adapter")
        # A name without "phi3" in it: llama.cpp gives models named so Phi-3's token attributes, and fails when the
        # vocabulary lacks Phi-3's </s>, <s>, <unk> and <|endoftext|> (the fixtures' tokenizers are Gemma-style).
        named = ("--name", f"tiny {name.replace('phi3', 'phi-three')} judge")
        files = {}
        for t in ("f16", "q8_0"):
            files[t] = os.path.join(work, f"{name}-{t}.gguf")
            qlora("export", "--model", folder, "--type", t, "--out", files[t], *named)
        compare(f"{name} base f16 vs transformers", logits(files["f16"], ids, vocab), base_ref, 1e-2)
        # q8_0: these weights (std 0.5 on 32 columns) are far rougher than trained ones, so q8_0's rounding alone can
        # move the logits past 3e-2; the limit is on the difference from llama-quantize's q8_0 of our f16 export.
        ours_q8 = logits(files["q8_0"], ids, vocab)
        theirs = os.path.join(work, f"{name}-q8_0-llama-quantize.gguf")
        run([JUDGE, "quantize", files["f16"], theirs, str(FTYPES["q8_0"])])
        theirs_q8 = logits(theirs, ids, vocab)
        compare(f"{name} base q8_0 vs transformers", ours_q8, base_ref)
        compare(f"{name} llama-quantize's q8_0 of our f16 vs transformers", theirs_q8, base_ref)
        compare(f"{name} base q8_0 vs llama-quantize's q8_0 of our f16 export", ours_q8, theirs_q8, 1e-4)
        merged = os.path.join(work, f"{name}-merged-f16.gguf")
        qlora("export", "--model", folder, "--adapter", adapter, "--type", "f16", "--out", merged, *named)
        compare(f"{name} f16 (adapter merged) vs transformers with the adapter", logits(merged, ids, vocab), lora_ref, 1e-2)
        base_only = logits(files["f16"], ids, vocab)
        for t in ("f32", "f16"):
            lora = os.path.join(work, f"{name}-adapter-{t}.gguf")
            qlora("export", "--model", folder, "--adapter", adapter, "--format", "gguf-lora", "--type", t, "--out", lora, *named)
            applied = logits(files["f16"], ids, vocab, lora=lora)
            compare(f"{name} base f16 + LoRA GGUF {t} (llama.cpp --lora) vs transformers with the adapter", applied, lora_ref, 1e-2)
            change = float(np.abs(applied - base_only).max())
            report(change > 1e-3 * float(np.abs(base_only).max()), f"{name} LoRA GGUF {t}: the adapter changes llama.cpp's logits (max change {change:.3f})")


def gguf_types(path):
    import gguf
    return {t.name: (t.tensor_type.name, [int(d) for d in t.shape]) for t in gguf.GGUFReader(path).tensors}


def check_bytes(work, make_fixture):
    model = tiny_folder(work)
    syn = {  # name: (layers, hidden, intermediate, heads, kv heads, tied)
        "syn-256": (1, 256, 512, 4, 2, 0),
        "syn-24-layers": (24, 256, 352, 4, 2, 0),
        "syn-tied-10-layers": (10, 96, 80, 3, 1, 1),
        "syn-80-layers-gqa": (80, 256, 256, 4, 2, 0),
    }
    folders = {"tiny": model}
    for name, shape in syn.items():
        folders[name] = os.path.join(work, name)
        run([sys.executable, os.path.join(ROOT, "scripts", "make_synthetic_llama.py"), folders[name], *map(str, shape)])
    env = dict(os.environ, LIBGGML=os.path.join(LLAMACPP, "bin", "libggml-base.so"),
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    fixture = {"note": "llama_model_quantize's tensor types for our f16 export of each model (scripts/check_gguf_llamacpp.py bytes --make-type-fixture)",
               "models": []}
    for name, folder in folders.items():
        exact = os.path.join(work, f"{name}-bf16.gguf")
        qlora("export", "--model", folder, "--type", "bf16", "--out", exact)
        f16 = os.path.join(work, f"{name}-f16.gguf")
        qlora("export", "--model", folder, "--type", "f16", "--out", f16)
        config = json.load(open(os.path.join(folder, "config.json")))
        layers, heads, kv = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
        entry = {"name": name, "layers": layers, "tied": bool(config.get("tie_word_embeddings")),
                 "is70B": layers == 80 and heads != kv, "types": {}}
        ours = []
        for t in ("q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"):
            out = os.path.join(work, f"{name}-{t}.gguf")
            qlora("export", "--model", folder, "--type", t, "--out", out)
            ours.append(out)
            theirs = os.path.join(work, f"{name}-{t}-llama-quantize.gguf")
            run([JUDGE, "quantize", f16, theirs, str(FTYPES[t])])
            a, b = gguf_types(out), gguf_types(theirs)
            differ = [k for k in b if a.get(k) != b[k]]
            counts = {}
            for kind, _ in a.values():
                counts[kind] = counts.get(kind, 0) + 1
            report(not differ and set(a) == set(b), f"{name} {t}: tensor types as llama-quantize chose them for our f16 export "
                   f"({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})" + (f"; differ: {differ[:5]}" if differ else ""))
            if t != "q8_0":
                entry["types"][t] = [{"name": k, "shape": v[1], "type": v[0]} for k, v in b.items() if len(v[1]) > 1]
        fixture["models"].append(entry)
        out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_ggml_quantizers.py"), exact, *ours],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in out.stdout.strip().splitlines():
            print(line.replace(work + "/", ""), flush=True)
        report(out.returncode == 0, f"{name}: every quantized tensor byte-identical to ggml_quantize_chunk")
    if make_fixture:
        path = os.path.join(FIXTURES, "gguf", "llama-quantize-types.json")
        with open(path, "w") as f:
            json.dump({"note": fixture["note"], "models": [m for m in fixture["models"] if m["name"] != "syn-256"]}, f, separators=(",", ":"))
            f.write("\n")
        print(f"wrote {path}")


def check_smollm2(work):
    import torch
    from transformers import AutoModelForCausalLM
    home = os.environ.get("QLORA_HOME", os.path.join(ROOT, ".build", "qlora-home"))
    os.environ["QLORA_HOME"] = home
    qlora("fetch", "smollm2-135m")
    folder = os.path.join(home, "models", "smollm2-135m")
    ref = json.load(open(os.path.join(FIXTURES, "gguf", "smollm2-forward-reference.json")))
    ids = ref["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).float()
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].double().numpy()
    vocab = reference.shape[-1]
    files = {}
    for t in ("f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"):
        files[t] = os.path.join(work, f"smollm2-{t}.gguf")
        qlora("export", "--model", folder, "--type", t, "--out", files[t])
    for t, limit in (("f16", 1e-2), ("bf16", 1e-2), ("q8_0", None)):
        compare(f"smollm2 {t} vs transformers ({len(ids)} positions)", logits(files[t], ids, vocab), reference, limit)
    for t in ("f16", "q8_0"):
        greedy = [int(x) for x in run([JUDGE, "greedy", files[t], str(len(ref["greedy_ids"])), *map(str, ids)]).split()]
        report(greedy == ref["greedy_ids"][:len(greedy)] and len(greedy) == len(ref["greedy_ids"]),
               f"smollm2 {t}: llama.cpp's {len(greedy)} greedy tokens equal transformers' {len(ref['greedy_ids'])}")
    text = os.path.join(FIXTURES, "perplexity", "essay.txt")

    def perplexity(path):
        line = run([JUDGE, "perplexity", path, text, "512"]).split()
        return float(line[-1]), int(line[1])

    base, n = perplexity(files["f16"])
    print(f"smollm2 perplexity on essay.txt ({n} tokens, chunks of 512): f16 {base:.4f}, bf16 {perplexity(files['bf16'])[0]:.4f}", flush=True)
    for t in ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"):
        theirs = os.path.join(work, f"smollm2-{t}-llama-quantize.gguf")
        run([JUDGE, "quantize", files["f16"], theirs, str(FTYPES[t])])
        ours_ppl, theirs_ppl = perplexity(files[t])[0], perplexity(theirs)[0]
        report(ours_ppl <= theirs_ppl * 1.01,
               f"smollm2 {t}: perplexity ours {ours_ppl:.4f}, llama-quantize of our f16 export {theirs_ppl:.4f} (f16 {base:.4f})")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    parts = args or ["tiny", "lora", "bytes", "families"]
    if not os.path.exists(JUDGE):
        print(f"llama.cpp is not built: {JUDGE} is missing (run scripts/build_llamacpp.sh)")
        sys.exit(3)
    make = "--make-type-fixture" in sys.argv
    checks = {"tiny": check_tiny, "lora": check_lora, "bytes": lambda w: check_bytes(w, make), "smollm2": check_smollm2,
              "families": check_families}
    unknown = [p for p in parts if p not in checks]
    if unknown:
        sys.exit(f"unknown part {unknown}; choose from {', '.join(checks)}")
    with tempfile.TemporaryDirectory() as work:
        for part in parts:
            checks[part](work)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
