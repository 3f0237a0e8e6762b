"""Makes Tests/Fixtures/metrics/goldens.json: the task metrics of `qlora eval --generate` as the reference packages
compute them, on fixed and seeded random inputs.

- ROUGE-L: `rouge_score.rouge_scorer.RougeScorer(["rougeL"])` (default tokenizer, no stemmer; `use_stemmer=True`
  is not supported by us and not asked for), `score` for one reference, `score_multi` (the reference with the best F)
  for several; also the tokenizer's tokens.
- BLEU: `sacrebleu.metrics.BLEU()` with its defaults (tokenizer 13a, smoothing "exp", effective_order False,
  max_ngram_order 4, case-sensitive), `corpus_score`; also the 13a tokenizer's output on single lines.
- exact match: the answer and a reference equal after Python's `str.strip()` (the demo's whitespace trim), any reference.
- accuracy: our definition for single-label answers (no package has one): the label is the answer's first non-empty
  line, and it is correct when SQuAD's `normalize_answer` (lowercase, ASCII punctuation removed, the articles a/an/the
  removed, whitespace collapsed; the normalisation of the SQuAD v1.1 evaluation script and of HELM's quasi-exact match)
  of the label equals that of a reference. Spelled out below so that the fixture states it.

Run from the repository root with the shared virtual environment:
    /work/pyenv/bin/python scripts/make_metric_goldens.py
"""
import json
import random
import re
import string
import sys

import rouge_score
import sacrebleu
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

OUT = "Tests/Fixtures/metrics/goldens.json"

# Texts that exercise each rule: punctuation classes of the 13a tokenizer, numbers with separators, HTML entities,
# "<skipped>", hyphenated line ends, Unicode letters and digits (dropped by ROUGE's ASCII tokenizer, kept by 13a),
# case mappings that reach ASCII (Turkish dotted I, the Kelvin sign), combining marks vs precomposed letters,
# Python's whitespace (NBSP, ideographic space, U+001C..U+001F, U+0085) and non-whitespace (ZWSP), emoji, empty text.
TEXTS = [
    "",
    " ",
    "\t\n",
    "The quick brown fox jumps over the lazy dog.",
    "the quick brown dog jumps on the log.",
    "Hello, world! It's 3.14 and 1,000,000 people.",
    "A-B, x-1, 3-4 and 10-20; 2026-12-06.",
    "He said \"hi\" & left (quickly) [really] {yes} <no> ~tilde~ `tick` ^caret^ |pipe| _under_ @at #hash $5 %pct *star +plus =eq /slash\\back",
    "&quot;quoted&quot; &amp; &lt;tag&gt; &unknown;",
    "Line one-\nline two\nline three",
    "<skipped> text after skip",
    "a.b.c 1.2.3 a,b,c 1,2,3 .a .1 ,x ,2 x. 2. x, 2,",
    "Ends with a tokenized period .",
    "Ünïcödé wörds, café and naïve résumé.",
    "cafe\u0301 vs caf\u00e9",
    "İstanbul and KELVIN \u212a and straße STRASSE",
    "日本語のテキスト、句読点。",
    "emoji 😀 in 👍🏽 text",
    "non\u00a0breaking\u3000ideographic\u2003em space",
    "sep\x1cfile\x1dgroup\x1erecord\x1funit",
    "next\x85line and zero\u200bwidth",
    "Tabs\tand  multiple   spaces   ",
    "MiXeD CaSe WoRdS",
    "2024-01-15",
    "1999-05-03",
    "The answer is 42.",
    "42",
    "Positive.",
    "positive",
    "The cat sat on the mat.",
    "A cat sat on a mat",
    "an apple a day",
    "The The the",
    "theatre and another",
    "Answer:\n\nNegative\nbecause the review is bad.",
    "\n\n  Yes, it is.  \n",
    "yes it is",
    "'single quotes' and don't",
    "question? exclamation! colon: semicolon;",
    "digits١٢٣ and ½ and ²",
]

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "quick", "brown", "fox", "jumps", "over", "lazy", "Paris", "is",
         "capital", "of", "France", "2024", "3.5", "1,000", "x-1", "don't", "café", "naïve", "日本", "!", "?", ",", ".",
         "\"", "(", ")", "-", "&", "&amp;", "e.g.", "U.S.", "42", "Yes", "no", "NO"]


def random_text(rng, low=0, high=14):
    words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
    text = ""
    for w in words:
        text += w if rng.random() < 0.2 else " " + w
    return text if rng.random() < 0.8 else text.upper()


def rouge_case(scorer, prediction, references):
    if len(references) == 1:
        score = scorer.score(references[0], prediction)["rougeL"]
    else:
        score = scorer.score_multi(references, prediction)["rougeL"]
    return {"prediction": prediction, "references": references, "precision": score.precision, "recall": score.recall,
            "fmeasure": score.fmeasure}


def bleu_case(hypotheses, references):
    """`references`: per hypothesis a list of its references (any number, at least one)."""
    streams = max(len(r) for r in references)
    ref_streams = [[r[k] if k < len(r) else None for r in references] for k in range(streams)]
    score = BLEU().corpus_score(hypotheses, ref_streams)
    return {"hypotheses": hypotheses, "references": references, "score": score.score, "counts": list(score.counts),
            "totals": list(score.totals), "precisions": list(score.precisions), "bp": score.bp, "sys_len": score.sys_len,
            "ref_len": score.ref_len}


def squad_normalize(s):
    """SQuAD v1.1's normalize_answer."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def answer_label(answer):
    for line in answer.splitlines():
        if line.strip():
            return line
    return ""


def accuracy_case(prediction, references):
    label = answer_label(prediction)
    correct = any(squad_normalize(label) == squad_normalize(r) for r in references)
    return {"prediction": prediction, "references": references, "label": label, "normalized_label": squad_normalize(label),
            "score": 1.0 if correct else 0.0}


def exact_match_case(prediction, references):
    correct = any(prediction.strip() == r.strip() for r in references)
    return {"prediction": prediction, "references": references, "score": 1.0 if correct else 0.0}


def main():
    rng = random.Random(14)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    tokenizer = Tokenizer13a()
    extra = [random_text(rng) for _ in range(30)]
    texts = TEXTS + extra

    out = {
        "versions": {"rouge_score": getattr(rouge_score, "__version__", "0.1.2"), "sacrebleu": sacrebleu.__version__,
                     "python": sys.version.split()[0]},
        "rouge_tokens": [{"text": t, "tokens": rouge_tokenize.tokenize(t, None)} for t in texts],
        "bleu_13a": [{"text": t, "tokenized": tokenizer(t.rstrip())} for t in texts],
    }

    pairs = [(TEXTS[i], [TEXTS[j]]) for i, j in [(3, 4), (4, 3), (0, 3), (3, 0), (0, 0), (1, 2), (5, 5), (6, 11), (13, 14),
                                                  (15, 22), (16, 17), (29, 30), (27, 28), (24, 23), (36, 37), (31, 32)]]
    pairs += [(TEXTS[3], [TEXTS[4], TEXTS[29], TEXTS[0]]), (TEXTS[30], [TEXTS[0], TEXTS[29]]), (TEXTS[27], [TEXTS[28], TEXTS[28]])]
    for _ in range(40):
        pairs.append((random_text(rng), [random_text(rng) for _ in range(rng.choice([1, 1, 1, 2, 3]))]))
    out["rouge_l"] = [rouge_case(scorer, p, r) for p, r in pairs]
    # Per-example BLEU in the answers file: sacrebleu.sentence_bleu (exp smoothing, effective order).
    out["bleu_sentence"] = [{"hypothesis": p, "references": r, "score": sacrebleu.sentence_bleu(p, r).score} for p, r in pairs]

    corpora = [
        ([TEXTS[3]], [[TEXTS[3]]]),
        ([TEXTS[3]], [[TEXTS[4]]]),
        ([TEXTS[4], TEXTS[5], TEXTS[6]], [[TEXTS[3]], [TEXTS[5]], [TEXTS[11]]]),
        (["the cat"], [["the cat sat on the mat"]]),                              # brevity penalty
        (["the cat sat on the mat today again"], [["the cat"]]),                  # longer than the reference
        (["cat the"], [["the cat"]]),                                             # unigrams only: exp smoothing
        (["a b c d"], [["a b x d"]]),                                             # a zero trigram and 4-gram count
        (["totally different words here"], [["nothing in common at all"]]),      # no match: 0
        ([""], [["something"]]),                                                  # empty hypothesis
        (["something"], [[""]]),                                                  # empty reference
        (["", ""], [["", ""], [""]]),                                             # nothing at all
        ([TEXTS[3], TEXTS[12]], [[TEXTS[4], TEXTS[3]], [TEXTS[11]]]),              # two references
        (["the cat is on the mat"], [["the cat sat on the mat", "there is a cat on the mat", "a cat is on a mat"]]),
        ([TEXTS[7], TEXTS[8], TEXTS[9], TEXTS[10]], [[TEXTS[8]], [TEXTS[7], TEXTS[8]], [TEXTS[9]], [TEXTS[10], TEXTS[9], TEXTS[3]]]),
        ([TEXTS[13], TEXTS[14], TEXTS[15], TEXTS[16], TEXTS[17]], [[TEXTS[14]], [TEXTS[13]], [TEXTS[15].lower()], [TEXTS[16]], [TEXTS[17]]]),
        ([TEXTS[18], TEXTS[19], TEXTS[20], TEXTS[21]], [[TEXTS[18]], ["sep file group record unit"], [TEXTS[20]], ["tabs and multiple spaces"]]),
        (["1999-05-03", "2024-01-15", "1999-05-04"], [["1999-05-03"], ["2024-01-15"], ["1999-05-03"]]),
    ]
    for _ in range(12):
        n = rng.randint(1, 8)
        hyps = [random_text(rng) for _ in range(n)]
        refs = [[random_text(rng, 1) for _ in range(rng.choice([1, 1, 2, 3]))] for _ in range(n)]
        corpora.append((hyps, refs))
    out["bleu_corpus"] = [bleu_case(h, r) for h, r in corpora]

    em = [(TEXTS[23], ["2024-01-15"]), (" 2024-01-15\n", ["2024-01-15"]), ("2024-01-15.", ["2024-01-15"]),
          ("cafe\u0301", ["caf\u00e9"]), ("caf\u00e9", ["caf\u00e9 "]), ("\u00a0x\u3000", ["x"]), ("\x1cx\x1f", ["x"]),
          ("\u200bx", ["x"]), ("", [""]), ("  ", [""]), ("", ["a"]), ("B", ["a", "b", " B "]), ("Paris", ["paris"]),
          ("a\nb", ["a b"]), ("\x85y\x85", ["y"])]
    out["exact_match"] = [exact_match_case(p, r) for p, r in em]

    acc = [("Positive.", ["positive"]), ("Positive. The review praises it.", ["positive"]),
           ("Positive\nThe review praises it.", ["positive"]), ("\n\n  Negative  \nbecause", ["negative"]),
           ("The answer is B", ["B"]), ("B", ["b"]), ("(B)", ["b"]), ("The Eiffel Tower", ["Eiffel Tower"]),
           ("An apple", ["apple"]), ("theatre", ["atre"]), ("Théa", ["théa"]), ("a", [""]), ("", [""]), ("", ["x"]),
           ("  \n \n", ["a"]), ("yes, it is", ["Yes it is!", "no"]), ("No", ["yes", "maybe"]),
           ("Café", ["café"]), ("CAFÉ", ["café"]), ("x\u2028y", ["x"]), ("x\ry", ["x"]), ("1,000", ["1000"]),
           ("the_cat", ["_cat"]), ("an\u00e9", ["an\u00e9"]), ("a\u00e9 b", ["\u00e9 b"]), ("l'a", ["la"]), ("a-the-an", [""]),
           ("«Yes»", ["yes"]), ("Yes…", ["yes"]), ("a«b", ["«b"]), ("a\u0661", ["\u0661"]), ("\u00bd a", ["\u00bd"])]
    out["accuracy"] = [accuracy_case(p, r) for p, r in acc]

    # SHA-256 as the model card computes it, of a few byte strings and of a fixture file.
    import hashlib
    blobs = ["", "abc", "a" * 1000, "The quick brown fox jumps over the lazy dog", "x" * 55, "y" * 56, "z" * 64, "日本語"]
    out["sha256"] = [{"text": b, "hex": hashlib.sha256(b.encode()).hexdigest()} for b in blobs]
    config = "Tests/Fixtures/tiny-llama/base/config.json"
    out["sha256_file"] = {"path": "tiny-llama/base/config.json", "hex": hashlib.sha256(open(config, "rb").read()).hexdigest(),
                          "bytes": len(open(config, "rb").read()), "lines": len(open(config, "rb").read().splitlines())}

    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {len(out['rouge_tokens'])} texts, {len(out['rouge_l'])} ROUGE-L cases, "
          f"{len(out['bleu_corpus'])} BLEU corpora, {len(out['exact_match'])} exact-match and {len(out['accuracy'])} accuracy cases")


if __name__ == "__main__":
    main()
