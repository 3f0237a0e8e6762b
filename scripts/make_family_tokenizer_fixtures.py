#!/usr/bin/env python3
"""Make Tests/Fixtures/family-tokenizers/: tiny tokenizers laid out as the Qwen3, Gemma, Phi-3 and Phi-4-mini
tokenizer.json files are, with goldens from the `tokenizers` library.

The real files are not reachable here (the Hub is not), so each tiny tokenizer is built by transformers' own
tokenizer class for that family, which fixes the layout (normalizer, pre-tokenizer, decoder, model flags), from a
small vocabulary and merges trained with `tokenizers`; then the family's special tokens are added as its
tokenizer.json has them:

  gemma/      transformers' GemmaTokenizer: BPE with byte_fallback and fuse_unk, normalizer Replace(" " → "▁"),
              pre-tokenizer Split(" ", merged_with_previous) (which never splits: the spaces are gone by then),
              decoder Replace/ByteFallback/Fuse; <pad> <eos> <bos> <unk> <mask> first, <start_of_turn> and
              <end_of_turn> special; a "<bos> $A" post-processor (add_bos_token).
  qwen3/      transformers' Qwen2Tokenizer (Qwen3 uses it): NFC, Split(Qwen 2 regex, Isolated) + ByteLevel without
              regex, ByteLevel decoder; <|endoftext|> <|im_start|> <|im_end|> special, <think> </think> not special.
  phi3/       transformers' LlamaTokenizer (Phi-3-mini's): Metaspace(prepend first, no split), byte_fallback,
              decoder Replace/ByteFallback/Fuse/Strip; <s> </s> <unk> first; Phi-3's chat tokens <|endoftext|>,
              <|assistant|>, <|end|>, <|system|>, <|user|> special with rstrip (as Phi-3's added tokens are marked).
  phi4-mini/  byte-level BPE with the GPT-4o split regex (transformers' `_GPT4O_SPLIT`, the o200k pattern Phi-4-mini
              uses): Split(Isolated) + ByteLevel without regex, ByteLevel decoder; <|endoftext|> <|system|> <|user|>
              <|assistant|> <|end|> <|tool|> <|/tool|> special.

goldens.jsonl: per text (edge cases, and each family's chat rendering of two conversations), the ids without and
with special tokens and the decode (with and without skip_special_tokens); decode_ids lines decode random id lists.

Run from the repository root:  python3 scripts/make_family_tokenizer_fixtures.py   (needs tokenizers, transformers 5)
"""
import json
import os
import random

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import GemmaTokenizer, LlamaTokenizer, Qwen2Tokenizer, PreTrainedTokenizerFast
from transformers.integrations.gguf.gguf_tokenizer_mapping import _GPT4O_SPLIT
from tokenizers import decoders

OUT = "Tests/Fixtures/family-tokenizers"
CORPUS = """\
The quick brown fox jumps over the lazy dog. What is 1+1? One plus one is two, and 2+2 is four.
Reasoning first, then the answer. Bonjour, merci, au revoir! Naïve café owners say: the weather is fine.
DON'T SHOUT, they're here; it's 12345 and 3.14159. Tabs\tand new lines\n\nand  double  spaces.
日本語のテキスト and emoji 🤗 appear too. HelloWorld CamelCase McDonald's iPhone.
"""
TEXTS = [
    "Hello world", "  leading and trailing spaces  ", "tabs\tand\nnew lines\n\n", "naïve café — “quotes”",
    "日本語のテキスト", "emoji 🤗🚀 mixed", "numbers 2024 and 3.14159 and 1234567", "don't stop DON'T WE'LL",
    "HelloWorld CamelCase McDonald's iPhone", "unseen chars: ЖЖЖ ∑∑ ☃", "", " ", "\n", "a  b   c",
    "▁literal marker", "e\u0301 combining", "path/to/file\r\n",
]
CHATS = [
    [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "Two."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bonjour"},
     {"role": "assistant", "content": "Bonjour!"}, {"role": "user", "content": "  merci  "}],
]
TEMPLATES = {"gemma": "gemma-3.jinja", "qwen3": "qwen3.jinja", "phi3": "phi-3.jinja", "phi4-mini": "phi-4-mini.jinja"}


def trained(pre, normalizer=None, alphabet=None, specials=(), size=500):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    if normalizer:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=size, min_frequency=1, show_progress=False, special_tokens=list(specials),
                                  initial_alphabet=alphabet or [])
    tok.train_from_iterator([CORPUS] * 3, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def sentencepiece_vocab(first):
    """A SentencePiece-style vocabulary: the given tokens, the 256 byte tokens, then trained pieces."""
    vocab, merges = trained(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True))
    out = {}
    for t in first + [f"<0x{b:02X}>" for b in range(256)]:
        out[t] = len(out)
    for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        if t not in out:
            out[t] = len(out)
    return out, merges


def build(family):
    if family == "gemma":
        first = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
        vocab, merges = sentencepiece_vocab(first)
        tok = GemmaTokenizer(vocab=vocab, merges=merges)
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        return tok
    if family == "phi3":
        vocab, merges = sentencepiece_vocab(["<unk>", "<s>", "</s>"])
        tok = LlamaTokenizer(vocab=vocab, merges=merges, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>")
        tok.add_special_tokens({"additional_special_tokens": [
            AddedToken(t, rstrip=True, lstrip=False, normalized=False, special=True)
            for t in ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"]]})
        return tok
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if family == "qwen3":
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated", invert=False),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        vocab, merges = trained(pre, normalizers.NFC(), alphabet)
        tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>")
        tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
        tok.add_tokens([AddedToken("<think>", special=False, normalized=False), AddedToken("</think>", special=False, normalized=False)])
        return tok
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_GPT4O_SPLIT), "isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    vocab, merges = trained(pre, None, alphabet)
    base = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    base.pre_tokenizer = pre
    base.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=base, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                                                          "<|end|>", "<|tool|>", "<|/tool|>"]})
    return tok


def main():
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_chat_template_goldens import render_chat
    rng = random.Random(2468)
    for family, template in TEMPLATES.items():
        tok = build(family)
        folder = os.path.join(OUT, family)
        tok.save_pretrained(folder)
        for extra in ["chat_template.jinja", "special_tokens_map.json"]:
            if os.path.exists(os.path.join(folder, extra)):
                os.remove(os.path.join(folder, extra))
        fast = tok.backend_tokenizer if hasattr(tok, "backend_tokenizer") else tok._tokenizer
        raw = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        if family == "gemma":
            # Gemma's tokenizer.json puts <bos> in front (its post-processor "<bos> $A"; add_bos_token).
            from tokenizers import processors
            raw.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                               special_tokens=[("<bos>", raw.token_to_id("<bos>"))])
            raw.save(os.path.join(folder, "tokenizer.json"))
            fast = raw
        source = open(os.path.join("Tests/Fixtures/chat-templates", template), encoding="utf-8").read()
        texts = list(TEXTS)
        for chat in CHATS:
            for agp in (False, True):
                r = render_chat(source, chat, agp, tok.bos_token, tok.eos_token, {})
                if "rendered" in r:
                    texts.append(r["rendered"])
        with open(os.path.join(folder, "goldens.jsonl"), "w", encoding="utf-8") as f:
            for t in texts:
                ids = raw.encode(t, add_special_tokens=False).ids
                with_special = raw.encode(t, add_special_tokens=True).ids
                assert ids == fast.encode(t, add_special_tokens=False).ids
                f.write(json.dumps({"text": t, "ids": ids, "ids_with_special": with_special,
                                    "decoded": raw.decode(ids, skip_special_tokens=False),
                                    "decoded_with_special_skipped": raw.decode(with_special, skip_special_tokens=True)},
                                   ensure_ascii=False) + "\n")
            size = raw.get_vocab_size(with_added_tokens=True)
            for _ in range(20):
                ids = [rng.randrange(size) for _ in range(rng.randrange(1, 12))]
                f.write(json.dumps({"decode_ids": ids, "decoded": raw.decode(ids, skip_special_tokens=False)},
                                   ensure_ascii=False) + "\n")
        print("wrote", folder, len(texts), "texts")


if __name__ == "__main__":
    main()
