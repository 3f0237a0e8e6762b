#!/usr/bin/env python3
"""Make the SentencePiece-style BPE tokenizer fixtures in Tests/Fixtures/sentencepiece-bpe/.

A tiny BPE is trained with the Hugging Face `tokenizers` package (pip install tokenizers; made with
0.23.3) on a paragraph of text, then written as Llama-2/Mistral-style tokenizer.json files that share
one vocab (<unk>, <s>, </s>, the 256 <0xNN> byte tokens, then the trained tokens) and merges:

  legacy/       normalizer Prepend("▁") + Replace(" " → "▁"), no pre-tokenizer, byte_fallback
                (Llama 2 / Mistral v0.1); post-processor "<s> $A".
  metaspace/    no normalizer, pre-tokenizer Metaspace(prepend_scheme "first", split false),
                byte_fallback (newer Llama / Mistral files).
  no-fallback/  as legacy but byte_fallback false and fuse_unk true: unknown characters become <unk>.
  metaspace-decoder/  pre-tokenizer Metaspace(prepend_scheme "always", split true) and decoder
                Metaspace (older Llama conversions); byte tokens stay "<0xNN>" in the decode.

All but metaspace-decoder have the decoder Sequence[Replace("▁" → " "), ByteFallback, Fuse, Strip(" ", 1, 0)], a special added
token <|user|> and a normal added token "foo bar" (normalized: true, so it is matched after
normalization as "▁foo▁bar"). goldens.jsonl in each holds, per text, the ids with and without special
tokens and the decode (with and without skip_special_tokens); "decode_ids" lines decode arbitrary id
lists (invalid byte sequences included).

Run from the repository root:  python3 scripts/make_sentencepiece_fixture.py
"""
import json
import os
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = "Tests/Fixtures/sentencepiece-bpe"

PARAGRAPH = """\
The quick brown fox jumps over the lazy dog. A tokenizer splits text into pieces that a language model
can read; byte-pair encoding merges the most frequent pairs of symbols again and again until the
vocabulary is full. SentencePiece treats the input as a raw stream, replaces spaces with a visible
marker, and falls back to bytes for characters it has never seen. Numbers like 2024, 3.14 and 1,000
appear too, as do quotes ("hello"), apostrophes (don't, it's) and tabs\tor new lines.
Naïve café owners say: the weather is fine, thank you very much! Training on a tiny corpus gives a tiny
vocabulary, which is what a test fixture needs."""

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\n",
    "naïve café — “quotes”",
    "日本語のテキスト",
    "emoji 🤗🚀 mixed",
    "numbers 2024 and 3.14159",
    "<s>already has bos",
    "<|user|>Hi there<|user|> again",
    "say foo bar now",
    "foo bar",
    "foobar foo  bar",
    "",
    " ",
    "▁literal marker",
    "unseen chars: ЖЖЖ ∑∑ ☃",
    "don't stop",
]

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def train():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=1, special_tokens=[], show_progress=False)
    tok.train_from_iterator([PARAGRAPH], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    trained = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    vocab = {}
    for t in SPECIALS + BYTE_TOKENS:
        vocab[t] = len(vocab)
    for t, _ in trained:
        if t not in vocab:
            vocab[t] = len(vocab)
    return vocab, model["merges"]


def added_tokens():
    def entry(id_, content, special, normalized):
        return {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": normalized, "special": special}
    return [entry(0, "<unk>", True, False), entry(1, "<s>", True, False), entry(2, "</s>", True, False)]


def tokenizer_json(vocab, merges, variant):
    n = len(vocab)
    added = added_tokens() + [
        {"id": n, "content": "<|user|>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
        {"id": n + 1, "content": "foo bar", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": True, "special": False},
    ]
    if variant == "metaspace":
        normalizer = None
        pre = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    elif variant == "metaspace-decoder":
        normalizer = None
        pre = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    else:
        normalizer = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        pre = None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
        if variant == "metaspace-decoder" else {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": variant != "no-fallback",
            "ignore_merges": False, "vocab": vocab, "merges": merges,
        },
    }


def main():
    vocab, merges = train()
    rng = random.Random(1234)
    for variant in ["legacy", "metaspace", "no-fallback", "metaspace-decoder"]:
        folder = os.path.join(OUT, variant)
        os.makedirs(folder, exist_ok=True)
        data = tokenizer_json(vocab, merges, variant)
        text = json.dumps(data, ensure_ascii=False, indent=1)
        with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(text)
        config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", "pad_token": None, "tokenizer_class": "LlamaTokenizer"}
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=1)
        tok = Tokenizer.from_str(text)
        with open(os.path.join(folder, "goldens.jsonl"), "w", encoding="utf-8") as f:
            for t in TEXTS:
                ids = tok.encode(t, add_special_tokens=False).ids
                with_special = tok.encode(t, add_special_tokens=True).ids
                f.write(json.dumps({
                    "text": t, "ids": ids, "ids_with_special": with_special,
                    "decoded": tok.decode(ids, skip_special_tokens=False),
                    "decoded_with_special_skipped": tok.decode(with_special, skip_special_tokens=True),
                }, ensure_ascii=False) + "\n")
            size = tok.get_vocab_size(with_added_tokens=True)
            for _ in range(12):
                ids = [rng.randrange(size) for _ in range(rng.randrange(1, 12))]
                # Byte tokens in a row, valid or not.
                ids += [3 + rng.randrange(256) for _ in range(rng.randrange(0, 4))]
                f.write(json.dumps({"decode_ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)},
                                   ensure_ascii=False) + "\n")
            for ids in [[3 + 0xE6, 3 + 0x97, 3 + 0xA5], [3 + 0xE6, 3 + 0x97], [1, 3 + 0x41, 3 + 0xFF, 300]]:
                f.write(json.dumps({"decode_ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)},
                                   ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
