#!/usr/bin/env python3
"""Make Tests/Fixtures/qwen3-chat/: the completion-only labels of Qwen3 chat conversations, as transformers marks the
assistant tokens.

Qwen3's chat template (the real one, ../chat-templates/qwen3.jinja, from llama.cpp's models/templates/Qwen-Qwen3-0.6B)
keeps the `<think>` reasoning only of the assistant turns after the last user message: re-rendering a longer
conversation drops the reasoning of earlier turns. The tokens trained on are those of the final rendering of the whole
conversation, and the tokens counted in the loss are each assistant reply there. Reference: transformers'
`apply_chat_template(..., return_assistant_tokens_mask=True)` (what TRL's `assistant_only_loss` uses) on the same template
with `{% generation %}` / `{% endgeneration %}` put around each reply: from after the `<|im_start|>assistant\\n` header
through the `<|im_end|>\\n` that ends the turn (the script checks that the tags change nothing in the rendering).

Tokenizer: a tiny byte-level BPE built like Qwen's tokenizer.json (NFC, Split(Qwen 2 regex, Isolated) + ByteLevel
without regex, ByteLevel decoder), trained with `tokenizers` on a small corpus, with Qwen3's added tokens:
<|endoftext|>, <|im_start|>, <|im_end|> (special) and <think>, </think> (not special).

expected.jsonl: one line per conversation: "messages", "input_ids" (the final rendering tokenized as one string, no
special tokens added), "assistant_mask" (1 for the counted tokens), "rendered".

Run from the repository root:  python3 scripts/make_qwen3_chat_fixture.py   (needs tokenizers, transformers 5)
"""
import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

OUT = "Tests/Fixtures/qwen3-chat"
TEMPLATE = "Tests/Fixtures/chat-templates/qwen3.jinja"
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
CORPUS = """\
What is 1+1? One plus one is two. And 2+2? Two plus two is four. Let me think about it step by step.
The user asks a question; the assistant answers it. Bonjour, merci, au revoir. 9-4=5, 3*3=9.
Reasoning first, then the answer. I should add the numbers. The capital of France is Paris.
"""

CONVERSATIONS = [
    # Reasoning in the earlier turns (inline <think> and reasoning_content): dropped from the final rendering.
    [{"role": "user", "content": "What is 1+1?"},
     {"role": "assistant", "content": "<think>\nOne plus one.\n</think>\n\n2"},
     {"role": "user", "content": "And 2+2?"},
     {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."}],
    [{"role": "system", "content": "Think, then answer."},
     {"role": "user", "content": "What is 1+1?"},
     {"role": "assistant", "content": "2", "reasoning_content": "I should add the numbers."},
     {"role": "user", "content": "And 9-4?"},
     {"role": "assistant", "content": "<think>9-4=5</think>5"},
     {"role": "user", "content": "The capital of France?"},
     {"role": "assistant", "content": "Paris", "reasoning_content": "\nThe capital of France is Paris.\n"}],
    # Earlier turns without reasoning: the last turn still gets the (empty) think block.
    [{"role": "user", "content": "Bonjour"},
     {"role": "assistant", "content": "Bonjour!"},
     {"role": "user", "content": "Merci"},
     {"role": "assistant", "content": "Au revoir."}],
    # One turn with reasoning: nothing is dropped.
    [{"role": "user", "content": "3*3?"},
     {"role": "assistant", "content": "<think>\nThree times three.\n</think>\n\n9"}],
]


def generation_template(source):
    """The Qwen3 template with {% generation %} around each assistant reply (header excluded, <|im_end|>\\n included)."""
    edits = [
        ("        {%- if loop.index0 > ns.last_query_index %}",
         "        {{- '<|im_start|>' + message.role + '\\n' }}{%- generation %}\n        {%- if loop.index0 > ns.last_query_index %}", 1),
        ("{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content", "{{- '<think>\\n' + reasoning_content", 1),
        ("{{- '<|im_start|>' + message.role + '\\n' + content }}", "{{- content }}", 2),
        ("        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}",
         "        {{- '<|im_end|>\\n' }}{% endgeneration %}\n    {%- elif message.role == \"tool\" %}", 1),
    ]
    for old, new, count in edits:
        assert source.count(old) == count, old
        source = source.replace(old, new)
    return source


def main():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2), "isolated", invert=False),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"])
    tok.train_from_iterator([CORPUS] * 3, trainer=trainer)
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True, normalized=False),
                            AddedToken("<|im_end|>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    os.makedirs(OUT, exist_ok=True)
    tok.save(os.path.join(OUT, "tokenizer.json"))
    source = open(TEMPLATE, encoding="utf-8").read()
    with open(os.path.join(OUT, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(source)
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None}
    with open(os.path.join(OUT, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tagged = generation_template(source)
    with open(os.path.join(OUT, "expected.jsonl"), "w", encoding="utf-8") as f:
        for messages in CONVERSATIONS:
            plain = hf.apply_chat_template(messages, chat_template=source, tokenize=False)
            out = hf.apply_chat_template(messages, chat_template=tagged, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
            rendered = hf.apply_chat_template(messages, chat_template=tagged, tokenize=False)
            assert rendered == plain, (rendered, plain)
            assert out["input_ids"] == hf(plain, add_special_tokens=False)["input_ids"]
            assert sum(out["assistant_masks"]) > 0
            f.write(json.dumps({"messages": messages, "rendered": plain, "input_ids": out["input_ids"],
                                "assistant_mask": out["assistant_masks"]}, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
