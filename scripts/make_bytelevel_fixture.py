#!/usr/bin/env python3
"""Make the byte-level BPE tokenizer fixtures in Tests/Fixtures/bytelevel-bpe/.

Tiny byte-level BPEs are trained with the Hugging Face `tokenizers` package (pip install tokenizers;
made with 0.23.3), one per pre-tokenizer configuration that Llama-family models use:

  llama3/   Sequence[Split(Llama 3 regex, Isolated), ByteLevel(use_regex false)], ignore_merges true
  qwen2/    Sequence[Split(Qwen 2 regex, Isolated), ByteLevel(use_regex false)], normalizer NFC
  digits/   Sequence[Digits(individual_digits true), ByteLevel(use_regex true)] (SmolLM2's own file)
  gpt2/     ByteLevel(add_prefix_space true, use_regex true)

Each has added tokens exercising the flags: <|eot|> (special), <mask> (lstrip, rstrip), <w> (single_word)
and "hello world" (normalized, not special). goldens.jsonl holds, per text, the pre-tokenizer's pieces of
the normalized text ("splits"), the ids without special tokens and the decode; "decode_ids" lines decode random id lists. Texts are hand-picked edge cases plus
random strings drawn from letters, digits, whitespace (\r \n \t, U+00A0, U+3000), apostrophes,
punctuation, accents, combining marks, CJK and emoji.

Run from the repository root:  python3 scripts/make_bytelevel_fixture.py
"""
import json
import os
import random

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

OUT = "Tests/Fixtures/bytelevel-bpe"

LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

CORPUS = """\
The quick brown fox jumps over the lazy dog. Byte-level BPE never meets an unknown character: every
byte has a token, and merges build words from them. It's what GPT-2 did, and Llama 3 does too; they'll
keep doing it. Numbers: 12345, 3.14159, 2,718,281 and 1000000. Code: def f(x):\n    return x**2  # square
    if (a && b) { return; }\r\nWindows line endings\r\n and tabs\tbetween\twords. Naïve café résumé.
Hello world, hello world, HELLO WORLD! Don't stop; I'VE seen it. 日本語のテキスト and 中文 and emoji 🤗🚀.
"""

EDGE_TEXTS = [
    "Hello world! 12345 tokens",
    "don't we'll they're I've DON'T WE'LL THEY'RE I'VE it'ſ",
    "  leading spaces and\ttabs\n\nnewlines  ",
    "a \n\n  b\t\n c  ",
    "line\r\n\r\nnext\r\n",
    "x   \n   y",
    "   ",
    "\n",
    "",
    "1234567 12 1 ½ ² ٣٤٥",
    "\"quoted\" (paren) [bracket] {brace} <angle>",
    "naïve café résumé — “quotes”",
    "e\u0301 combining \u0301start",
    "Ame\u0301lie, A\u030a, \u1100\u1161\u11a8",
    "日本語のテキストと中文",
    "emoji 🤗🚀 mixed",
    "nbsp\u00a0here and ideographic\u3000space",
    "x\x1cy\x85z",
    "<|eot|>after<|eot|> <|eot|>",
    "a <mask>  b<mask>c",
    "a <w> b<w>c <w>",
    "say hello world now, hello worlds",
    "def f(x):\n    return x**2  # square",
    "tab\tseparated\tvalues\r\nwindows line",
    "'s 's 'S ' s '",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]

POOL = (list("abcdefghijklmnopqrstuvwxyzABCXYZ") * 3 + list("0123456789") * 2 + [" "] * 12 +
        ["\n", "\r", "\t", "\r\n", "\u00a0", "\u3000", "'", "'", "'s", "'LL", "'ve", ".", ",", "!", "?", "-", "(", ")",
         "\"", "#", "é", "ï", "ß", "Ü", "\u0301", "ſ", "日", "本", "語", "中", "🤗", "🚀", "½", "²", "٣", "—", "“", "”",
         "<|eot|>", "<mask>", "<w>", "hello world", "x\x1c"])


def random_texts(rng, n):
    out = []
    for _ in range(n):
        out.append("".join(rng.choice(POOL) for _ in range(rng.randrange(1, 30))))
    return out


def build(variant):
    if variant == "llama3":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), "isolated", invert=False),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif variant == "qwen2":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2), "isolated", invert=False),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif variant == "digits":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        pre = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok = Tokenizer(models.BPE(ignore_merges=(variant == "llama3")))
    tok.pre_tokenizer = pre
    if variant == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|eot|>"])
    tok.train_from_iterator([CORPUS] * 3, trainer=trainer)
    tok.add_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, special=True, normalized=False),
                    AddedToken("<w>", single_word=True, special=False, normalized=False),
                    AddedToken("hello world", normalized=True, special=False)])
    return tok


def main():
    rng = random.Random(20261123)
    for variant in ["llama3", "qwen2", "digits", "gpt2"]:
        tok = build(variant)
        folder = os.path.join(OUT, variant)
        os.makedirs(folder, exist_ok=True)
        tok.save(os.path.join(folder, "tokenizer.json"))
        config = {"bos_token": None, "eos_token": "<|eot|>", "unk_token": None, "pad_token": None}
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1)
        with open(os.path.join(folder, "goldens.jsonl"), "w", encoding="utf-8") as f:
            for t in EDGE_TEXTS + random_texts(rng, 150):
                normalized = tok.normalizer.normalize_str(t) if tok.normalizer else t
                splits = [s for s, _ in tok.pre_tokenizer.pre_tokenize_str(normalized)]
                ids = tok.encode(t, add_special_tokens=False).ids
                f.write(json.dumps({"text": t, "splits": splits, "ids": ids,
                                    "decoded": tok.decode(ids, skip_special_tokens=False)}, ensure_ascii=False) + "\n")
            # Arbitrary id lists: byte tokens in any order make invalid UTF-8 that decoding must repair.
            size = tok.get_vocab_size(with_added_tokens=True)
            for _ in range(40):
                ids = [rng.randrange(size) for _ in range(rng.randrange(1, 10))]
                f.write(json.dumps({"decode_ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                                    "decoded_skipping_special": tok.decode(ids, skip_special_tokens=True)},
                                   ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
