#!/usr/bin/env python3
"""Make Tests/Fixtures/gguf-tokenizers/: tokenizer folders of the Gemma 2, Gemma 3, Phi-3, Qwen3 and Phi-4-mini
layouts and the `tokenizer.*` metadata llama.cpp's own converter (convert_hf_to_gguf.py of the llama-cpp-python 0.3.36
sdist, its set_vocab, run with --vocab-only) writes for each.

  gemma2/     tokenizer.model: a SentencePiece BPE trained here with the `sentencepiece` package in Gemma's layout
              (<pad> <eos> <bos> <unk> at 0..3, a control piece <ctrl9> at 4, user-defined <mask> <start_of_turn> <end_of_turn> <unused0> <unused1>
              at 5..9 (<unused1> in no added_tokens_decoder, so it stays a NORMAL token), byte fallback, no dummy prefix, identity normalization); tokenizer.json made from
              it by transformers' SpmConverter; tokenizer_config.json with added_tokens_decoder as Gemma's repos have it
              (<mask> and <unused0> not marked special, which the converter still makes control tokens; a user-defined
              "▁hi▁there" at id 421, beyond the SentencePiece vocabulary), Gemma's chat template; config.json of a
              Gemma 2 with vocab_size 424 (ids 420..423 have no piece: [PAD<id>]).
  gemma3/     the same tokenizer files with a Gemma 3 config.json (llama.cpp's Gemma3Model takes the same path when
              tokenizer.model is there).
  phi3/       tokenizer.model in Phi-3-mini's (Llama's) layout (<unk> <s> </s>, byte fallback, dummy prefix);
              tokenizer.json with Phi-3's chat tokens as added tokens (<|endoftext|> <|assistant|> <|end|> <|user|>
              special, <|placeholder1|> not special), added_tokens.json (one id beyond vocab_size, which the converter
              skips), tokenizer_config.json with added_tokens_decoder and Phi-3's chat template; config.json of a Phi-3
              with vocab_size 410.
  qwen3/      Tests/Fixtures/family-tokenizers/qwen3 (byte-level BPE, Qwen2Tokenizer) with a Qwen3 config.json
              (vocab_size 8 above the tokenizer's ids, so [PAD<id>] tokens are written); the converter's gpt2 path.
  phi4-mini/  Tests/Fixtures/family-tokenizers/phi4-mini with tokenizer_class GPT2Tokenizer (as Phi-4-mini's file says,
              which is what sends llama.cpp's Phi3MiniModel to its gpt2 path) and a Phi-3 config.json.

expected.json in each: every tokenizer.* key the converter wrote, in its order, with its GGUF value type and value
(arrays as element type and values). The converter names a byte-level pre-tokenizer by hashing how the tokenizer
splits a test text; a tiny tokenizer's hash is none that llama.cpp knows, so the fixture gives the name that the real
tokenizer's hash has in llama.cpp's table ("qwen2" for Qwen3, "gpt-4o" for Phi-4-mini) in its place.

The converter needs a model to run, even for the vocabulary: a tiny random one of the family (gguf-families'
safetensors with the embedding widened) is written to a temporary folder, not to the fixture.

Usage: python3 scripts/make_gguf_tokenizer_fixtures.py LLAMA_CPP_SOURCE
  (needs sentencepiece, protobuf, transformers 5, tokenizers, torch, safetensors; LLAMA_CPP_SOURCE e.g. the sdist's
  vendor/llama.cpp)
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

OUT = "Tests/Fixtures/gguf-tokenizers"
FAMILY_TOKENIZERS = "Tests/Fixtures/family-tokenizers"
GGUF_FAMILIES = "Tests/Fixtures/gguf-families"

CORPUS = """\
The quick brown fox jumps over the lazy dog. A tokenizer splits text into pieces that a language model can read;
byte-pair encoding merges the most frequent pairs of symbols again and again until the vocabulary is full.
SentencePiece treats the input as a raw stream, replaces spaces with a visible marker, and falls back to bytes for
characters it has never seen. Numbers like 2024, 3.14 and 1,000 appear too, as do quotes ("hello"), apostrophes
(don't, it's) and tabs\tor new lines. Naive cafe owners say: the weather is fine, thank you very much! Training on
a tiny corpus gives a tiny vocabulary, which is what a test fixture needs. What is one plus one? Two, of course.
"""

GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}"
                  "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
                  "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
PHI3_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
                 "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
                 "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


def train_sentencepiece(work, name, vocab_size, **options):
    import sentencepiece as spm
    corpus = os.path.join(work, "corpus.txt")
    with open(corpus, "w") as f:
        f.write(CORPUS * 4)
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(work, name), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.995, split_digits=True,
                                   normalization_rule_name="identity", minloglevel=2, **options)
    return os.path.join(work, name + ".model")


def fast_tokenizer(model_path):
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
    proto = import_protobuf().ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)


def added(content, special):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": special}


def make_gemma(work, folder):
    from transformers import GemmaTokenizer
    model = train_sentencepiece(work, "gemma", 420, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                                eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                                user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>", "<unused0>", "<unused1>"],
                                control_symbols=["<ctrl9>"], add_dummy_prefix=False, remove_extra_whitespaces=False)
    tok = GemmaTokenizer(tokenizer_object=fast_tokenizer(model), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                         unk_token="<unk>", mask_token="<mask>", add_bos_token=True)
    tok.save_pretrained(folder)
    shutil.copy(model, os.path.join(folder, "tokenizer.model"))
    config = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    config["add_bos_token"] = True
    config["add_eos_token"] = False
    config["added_tokens_decoder"] = {
        "0": added("<pad>", True), "1": added("<eos>", True), "2": added("<bos>", True), "3": added("<unk>", True),
        "5": added("<mask>", False), "6": added("<start_of_turn>", True), "7": added("<end_of_turn>", True),
        "8": added("<unused0>", False), "421": added("\u2581hi\u2581there", False),
    }
    config["chat_template"] = GEMMA_TEMPLATE
    json.dump(config, open(os.path.join(folder, "tokenizer_config.json"), "w"), indent=2, ensure_ascii=False)


def make_phi3(work, folder):
    from transformers import LlamaTokenizer
    from tokenizers import AddedToken
    model = train_sentencepiece(work, "phi3", 400, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
                                remove_extra_whitespaces=False)
    tok = LlamaTokenizer(tokenizer_object=fast_tokenizer(model), bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>")
    chat = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|end|>", "<|user|>"]
    for token in chat:
        tok.add_tokens([AddedToken(token, special=token != "<|placeholder1|>", rstrip=True, normalized=False)],
                       special_tokens=token != "<|placeholder1|>")
    tok.save_pretrained(folder)
    shutil.copy(model, os.path.join(folder, "tokenizer.model"))
    ids = {t: tok.convert_tokens_to_ids(t) for t in chat}
    json.dump(dict(ids, **{"<|system|>": 415}), open(os.path.join(folder, "added_tokens.json"), "w"), indent=2)
    config = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    config["add_bos_token"] = False
    config["add_eos_token"] = False
    config["added_tokens_decoder"] = {"0": added("<unk>", True), "1": added("<s>", True), "2": added("</s>", False),
                                      **{str(i): added(t, t != "<|placeholder1|>") for t, i in ids.items()}}
    config["chat_template"] = PHI3_TEMPLATE
    json.dump(config, open(os.path.join(folder, "tokenizer_config.json"), "w"), indent=2, ensure_ascii=False)


def copy_family_tokenizer(name, folder, tokenizer_class=None):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(FAMILY_TOKENIZERS, name, f), os.path.join(folder, f))
    if tokenizer_class:
        path = os.path.join(folder, "tokenizer_config.json")
        config = json.load(open(path))
        config["tokenizer_class"] = tokenizer_class
        json.dump(config, open(path, "w"), indent=2, ensure_ascii=False)


def tokenizer_size(folder):
    tok = json.load(open(os.path.join(folder, "tokenizer.json")))
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok["added_tokens"]]
    return max(ids) + 1


def write_config(family, folder, vocab_size):
    """The gguf-families config of the family, with this vocabulary size."""
    source = {"gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3", "qwen3": "qwen3", "phi4-mini": "phi3"}[family]
    config = json.load(open(os.path.join(GGUF_FAMILIES, source, "config.json")))
    config["vocab_size"] = vocab_size
    json.dump(config, open(os.path.join(folder, "config.json"), "w"), indent=2)
    return source


def tiny_model(source, folder, work, vocab_size):
    """The gguf-families model's tensors with the embedding (and head) widened to vocab_size rows, in `work`."""
    import torch
    from safetensors.torch import load_file, save_file
    tensors = load_file(os.path.join(GGUF_FAMILIES, source, "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            t = tensors[name]
            tensors[name] = torch.cat([t, torch.zeros(vocab_size - t.shape[0], t.shape[1], dtype=t.dtype)])[:vocab_size].contiguous()
    save_file(tensors, os.path.join(work, "model.safetensors"), metadata={"format": "pt"})
    for f in os.listdir(folder):
        shutil.copy(os.path.join(folder, f), os.path.join(work, f))


CONVERT = """
import sys
pre = sys.argv[3]
sys.argv = ["convert_hf_to_gguf.py", sys.argv[1], "--vocab-only", "--outfile", sys.argv[2]]
sys.path.insert(0, {src!r})
import convert_hf_to_gguf as c
lookup = c.get_model_class
def with_pre(*args, **kwargs):
    model_class = lookup(*args, **kwargs)
    if pre:
        model_class.get_vocab_base_pre = lambda self, tokenizer: pre
    return model_class
c.get_model_class = with_pre
c.main()
"""


def summarize(path):
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(path)
    keys = []
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        types = field.types
        if types[0] == gguf.GGUFValueType.ARRAY:
            values = [float(np.float32(v)) if isinstance(v, float) else v for v in field.contents()]
            keys.append({"key": name, "type": "ARRAY", "array_of": types[-1].name, "value": values})
        else:
            value = field.contents()
            if isinstance(value, float):
                value = float(np.float32(value))
            keys.append({"key": name, "type": types[0].name, "value": value})
    return keys


def main():
    src = os.path.abspath(sys.argv[1])
    cases = {"gemma2": None, "gemma3": None, "phi3": None, "qwen3": "qwen2", "phi4-mini": "gpt-4o"}
    with tempfile.TemporaryDirectory() as work:
        for case, pre in cases.items():
            folder = os.path.join(OUT, case)
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            if case == "gemma2":
                make_gemma(work, folder)
            elif case == "gemma3":
                for f in os.listdir(os.path.join(OUT, "gemma2")):
                    if f != "config.json" and f != "expected.json":
                        shutil.copy(os.path.join(OUT, "gemma2", f), os.path.join(folder, f))
            elif case == "phi3":
                make_phi3(work, folder)
            elif case == "qwen3":
                copy_family_tokenizer("qwen3", folder)
            else:
                copy_family_tokenizer("phi4-mini", folder, tokenizer_class="GPT2Tokenizer")
            vocab_size = {"gemma2": 424, "gemma3": 424, "phi3": 410}.get(case) or tokenizer_size(folder) + 8
            source = write_config(case, folder, vocab_size)
            model_dir = os.path.join(work, case + "-model")
            os.makedirs(model_dir)
            tiny_model(source, folder, model_dir, vocab_size)
            out = os.path.join(work, case + ".gguf")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.path.join(src, "gguf-py"), os.environ.get("PYTHONPATH", "")]))
            subprocess.run([sys.executable, "-c", CONVERT.format(src=src), model_dir, out, pre or ""], check=True, env=env)
            with open(os.path.join(folder, "expected.json"), "w") as f:
                json.dump({"note": "tokenizer.* keys of llama.cpp's convert_hf_to_gguf.py --vocab-only (scripts/make_gguf_tokenizer_fixtures.py)"
                           + (f"; tokenizer.ggml.pre given as {pre!r}" if pre else ""), "keys": summarize(out)}, f, indent=0, ensure_ascii=False)
            print("wrote", folder)


if __name__ == "__main__":
    main()
