// Task metrics of generated answers against reference texts, computed as the standard implementations compute them
// (checked against the Python packages on Tests/Fixtures/metrics/goldens.json, made by scripts/make_metric_goldens.py):
//
//   exact_match  the answer equals a reference after stripping whitespace at both ends (Python's str.strip(), the
//                demo's normalisation); 1 or 0 per example, the mean over examples.
//   rouge_l      ROUGE-L F-measure as rouge-score's RougeScorer(["rougeL"]) gives it: its default tokenizer
//                (lowercase, every run of characters other than a-z0-9 a separator; no stemmer), LCS length L of the
//                token lists, P = L/|answer|, R = L/|reference|, F = 2PR/(P+R) (0 when either list is empty); with
//                several references the one with the best F (score_multi). The mean F over examples, in [0, 1].
//   bleu         corpus BLEU as sacrebleu's BLEU() computes it with its defaults: the 13a tokenizer (mteval-v13a),
//                case-sensitive, n-grams 1..4 clipped by the largest count in any reference, the closest reference
//                length (the shorter on ties) for the brevity penalty BP = exp(1 - r/c) when c < r, "exp" smoothing
//                (the k-th order with no match counts 1/2^k), no effective order; the score on sacrebleu's 0-100
//                scale. Per example (the answers file): sacrebleu.sentence_bleu (the same with effective order).
//   accuracy     for single-label answers: the label is the answer's first non-empty line, and it is correct when
//                it equals a reference after SQuAD's normalize_answer (lowercase, ASCII punctuation removed, the
//                articles a/an/the removed, whitespace collapsed), as the SQuAD v1.1 script and HELM's quasi-exact
//                match normalise; "Positive." and "positive" agree, "Positive, because..." on one line does not.
//
// Text is compared code point by code point, as Python compares str (no canonical equivalence).

#if canImport(Glibc)
import Glibc
#endif

// MARK: - Exact match

public enum ExactMatch {
    /// The answer without whitespace at either end.
    public static func normalize(_ text: String) -> String { PythonText.string(PythonText.strip(PythonText.scalars(text))) }

    /// 1 when the stripped answer equals a stripped reference, else 0.
    public static func score(prediction: String, references: [String]) -> Double {
        let answer = PythonText.strip(PythonText.scalars(prediction))
        return references.contains { PythonText.strip(PythonText.scalars($0)) == answer } ? 1 : 0
    }
}

// MARK: - ROUGE-L

public struct RougeScore: Sendable, Equatable {
    public var precision: Double
    public var recall: Double
    public var fmeasure: Double
}

public enum RougeL {
    /// rouge-score's default tokenizer without a stemmer: the runs of [a-z0-9] in the lowercased text.
    public static func tokens(_ text: String) -> [String] {
        var out: [String] = [], current = ""
        for c in PythonText.lower(PythonText.scalars(text)) {
            if (c.value >= 0x61 && c.value <= 0x7A) || (c.value >= 0x30 && c.value <= 0x39) {
                current.unicodeScalars.append(c)
            } else if !current.isEmpty {
                out.append(current)
                current = ""
            }
        }
        if !current.isEmpty { out.append(current) }
        return out
    }

    /// Length of the longest common subsequence (the bottom-up table, one row at a time).
    static func lcsLength(_ a: [String], _ b: [String]) -> Int {
        guard !a.isEmpty, !b.isEmpty else { return 0 }
        var previous = [Int](repeating: 0, count: b.count + 1), current = previous
        for i in 1...a.count {
            for j in 1...b.count {
                current[j] = a[i - 1] == b[j - 1] ? previous[j - 1] + 1 : max(previous[j], current[j - 1])
            }
            swap(&previous, &current)
        }
        return previous[b.count]
    }

    /// The score against one reference (rouge-score's `score(target, prediction)["rougeL"]`).
    public static func score(prediction: String, reference: String) -> RougeScore {
        let target = tokens(reference), predicted = tokens(prediction)
        guard !target.isEmpty, !predicted.isEmpty else { return RougeScore(precision: 0, recall: 0, fmeasure: 0) }
        let lcs = Double(lcsLength(target, predicted))
        let precision = lcs / Double(predicted.count), recall = lcs / Double(target.count)
        return RougeScore(precision: precision, recall: recall, fmeasure: fmeasure(precision, recall))
    }

    /// Against several references: the one with the best F (the first on ties), as `score_multi` picks it.
    public static func score(prediction: String, references: [String]) -> RougeScore {
        var best: RougeScore?
        for r in references {
            let s = score(prediction: prediction, reference: r)
            if best.map({ s.fmeasure > $0.fmeasure }) ?? true { best = s }
        }
        return best ?? RougeScore(precision: 0, recall: 0, fmeasure: 0)
    }

    static func fmeasure(_ precision: Double, _ recall: Double) -> Double {
        precision + recall > 0 ? 2 * precision * recall / (precision + recall) : 0
    }
}

// MARK: - BLEU

public struct BLEUScore: Sendable, Equatable {
    /// 0-100, as sacrebleu reports it.
    public var score: Double
    /// Matched and total n-grams of orders 1...4.
    public var counts: [Int]
    public var totals: [Int]
    /// 0-100 per order (after smoothing).
    public var precisions: [Double]
    public var brevityPenalty: Double
    public var hypothesisLength: Int
    public var referenceLength: Int
}

public enum SacreBLEU {
    static let maxOrder = 4

    /// sacrebleu's "13a" tokenizer (after its `rstrip()`), as one string of space-separated tokens.
    public static func tokenize13a(_ line: String) -> String {
        PythonText.string(Array(tokens13a(PythonText.rstrip(PythonText.scalars(line))).joined(separator: [" "])))
    }

    static func tokens13a(_ input: [Unicode.Scalar]) -> [[Unicode.Scalar]] {
        var line = replacing(input, "<skipped>", "")
        line = replacing(line, "-\n", "")
        line = replacing(line, "\n", " ")
        if line.contains("&") {
            for (entity, character) in [("&quot;", "\""), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")] {
                line = replacing(line, entity, character)
            }
        }
        // mteval's four substitutions, each a left-to-right pass of non-overlapping two-character matches (re.sub).
        var s: [Unicode.Scalar] = [" "]
        for c in line {
            let v = c.value
            // [{-~[-` -&(-+:-@/]: symbols set apart by spaces.
            if (0x7B...0x7E).contains(v) || (0x5B...0x60).contains(v) || (0x20...0x26).contains(v) || (0x28...0x2B).contains(v)
                || (0x3A...0x40).contains(v) || v == 0x2F {
                s += [" ", c, " "]
            } else {
                s.append(c)
            }
        }
        s.append(" ")
        func isDigit(_ c: Unicode.Scalar) -> Bool { c.value >= 0x30 && c.value <= 0x39 }
        func isPeriodOrComma(_ c: Unicode.Scalar) -> Bool { c == "." || c == "," }
        func pass(_ s: [Unicode.Scalar], _ matches: (Unicode.Scalar, Unicode.Scalar) -> Bool,
                  _ replacement: (Unicode.Scalar, Unicode.Scalar) -> [Unicode.Scalar]) -> [Unicode.Scalar] {
            var out: [Unicode.Scalar] = []
            var i = 0
            while i < s.count {
                if i + 1 < s.count, matches(s[i], s[i + 1]) {
                    out += replacement(s[i], s[i + 1])
                    i += 2
                } else {
                    out.append(s[i])
                    i += 1
                }
            }
            return out
        }
        s = pass(s, { !isDigit($0) && isPeriodOrComma($1) }, { [$0, " ", $1, " "] })   // ([^0-9])([\.,]) → \1 \2
        s = pass(s, { isPeriodOrComma($0) && !isDigit($1) }, { [" ", $0, " ", $1] })   // ([\.,])([^0-9]) →  \1 \2
        s = pass(s, { isDigit($0) && $1 == "-" }, { [$0, " ", $1, " "] })               // ([0-9])(-) → \1 \2
        return PythonText.split(s)
    }

    /// Python's str.replace: every non-overlapping occurrence, left to right.
    static func replacing(_ s: [Unicode.Scalar], _ pattern: String, _ replacement: String) -> [Unicode.Scalar] {
        let p = Array(pattern.unicodeScalars), r = Array(replacement.unicodeScalars)
        guard s.count >= p.count else { return s }
        var out: [Unicode.Scalar] = []
        var i = 0
        while i < s.count {
            if i + p.count <= s.count, s[i..<(i + p.count)].elementsEqual(p) {
                out += r
                i += p.count
            } else {
                out.append(s[i])
                i += 1
            }
        }
        return out
    }

    /// One segment's sufficient statistics: lengths, matched and total n-grams per order.
    struct Statistics {
        var hypothesisLength = 0, referenceLength = 0
        var correct = [Int](repeating: 0, count: SacreBLEU.maxOrder), total = [Int](repeating: 0, count: SacreBLEU.maxOrder)

        static func + (a: Statistics, b: Statistics) -> Statistics {
            var s = a
            s.hypothesisLength += b.hypothesisLength
            s.referenceLength += b.referenceLength
            for n in 0..<SacreBLEU.maxOrder { s.correct[n] += b.correct[n]; s.total[n] += b.total[n] }
            return s
        }
    }

    /// Tokens as ids of their code points (so n-grams compare as Python tuples of str do).
    struct Vocabulary {
        var ids: [[UInt32]: Int] = [:]
        mutating func encode(_ line: String) -> [Int] {
            tokens13a(PythonText.rstrip(PythonText.scalars(line))).map { token in
                let key = token.map(\.value)
                if let id = ids[key] { return id }
                ids[key] = ids.count
                return ids.count - 1
            }
        }
    }

    static func ngramCounts(_ tokens: [Int]) -> [ArraySlice<Int>: Int] {
        var counts: [ArraySlice<Int>: Int] = [:]
        for n in 1...maxOrder where tokens.count >= n {
            for i in 0...(tokens.count - n) { counts[tokens[i..<(i + n)], default: 0] += 1 }
        }
        return counts
    }

    static func statistics(_ hypothesis: [Int], _ references: [[Int]]) -> Statistics {
        var referenceCounts: [ArraySlice<Int>: Int] = [:]
        for r in references {
            for (ngram, count) in ngramCounts(r) { referenceCounts[ngram] = max(referenceCounts[ngram] ?? 0, count) }
        }
        var s = Statistics()
        s.hypothesisLength = hypothesis.count
        // The closest reference length; the shorter of two equally close.
        var closest = -1, closestLength = -1
        for r in references {
            let difference = abs(hypothesis.count - r.count)
            if closest == -1 || difference < closest || (difference == closest && r.count < closestLength) {
                closest = difference
                closestLength = r.count
            }
        }
        s.referenceLength = closestLength
        for (ngram, count) in ngramCounts(hypothesis) {
            s.total[ngram.count - 1] += count
            if let limit = referenceCounts[ngram] { s.correct[ngram.count - 1] += min(count, limit) }
        }
        return s
    }

    /// sacrebleu's compute_bleu with "exp" smoothing.
    static func score(_ s: Statistics, effectiveOrder: Bool) -> BLEUScore {
        var bp = 1.0
        if s.hypothesisLength < s.referenceLength {
            bp = s.hypothesisLength > 0 ? exp(1 - Double(s.referenceLength) / Double(s.hypothesisLength)) : 0
        }
        var precisions = [Double](repeating: 0, count: maxOrder)
        var result = BLEUScore(score: 0, counts: s.correct, totals: s.total, precisions: precisions, brevityPenalty: bp,
                               hypothesisLength: s.hypothesisLength, referenceLength: s.referenceLength)
        guard s.correct.contains(where: { $0 != 0 }) else { return result }
        var smooth = 1.0
        var order = maxOrder
        for n in 1...maxOrder {
            if s.total[n - 1] == 0 { break }
            if effectiveOrder { order = n }
            if s.correct[n - 1] == 0 {
                smooth *= 2
                precisions[n - 1] = 100 / (smooth * Double(s.total[n - 1]))
            } else {
                precisions[n - 1] = 100 * Double(s.correct[n - 1]) / Double(s.total[n - 1])
            }
        }
        // log(0) is floored to -9999999999, as sacrebleu's my_log does.
        let logSum = precisions[..<order].reduce(0.0) { $0 + ($1 == 0 ? -9_999_999_999 : log($1)) }
        result.precisions = precisions
        result.score = bp * exp(logSum / Double(order))
        return result
    }

    /// Corpus BLEU of `hypotheses`, each against its own list of references (one or more).
    public static func corpusScore(hypotheses: [String], references: [[String]]) -> BLEUScore {
        precondition(hypotheses.count == references.count, "one list of references per hypothesis")
        var vocabulary = Vocabulary()
        var total = Statistics()
        for (h, refs) in zip(hypotheses, references) {
            let hypothesis = vocabulary.encode(h)
            total = total + statistics(hypothesis, refs.map { vocabulary.encode($0) })
        }
        return score(total, effectiveOrder: false)
    }

    /// sacrebleu.sentence_bleu: one segment, with effective order.
    public static func sentenceScore(hypothesis: String, references: [String]) -> BLEUScore {
        var vocabulary = Vocabulary()
        let h = vocabulary.encode(hypothesis)
        return score(statistics(h, references.map { vocabulary.encode($0) }), effectiveOrder: true)
    }
}

// MARK: - Accuracy of single-label answers

public enum LabelAccuracy {
    /// The answer's label: its first line with anything but whitespace on it ("" when there is none).
    public static func label(of answer: String) -> String {
        let lines = PythonText.splitLines(PythonText.scalars(answer))
        return lines.first { !PythonText.strip($0).isEmpty }.map(PythonText.string) ?? ""
    }

    /// SQuAD's normalize_answer: lowercase, drop ASCII punctuation, drop the articles a/an/the as words, collapse whitespace.
    public static func normalize(_ text: String) -> String { PythonText.string(normalized(PythonText.scalars(text))) }

    static let punctuation = Set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~".unicodeScalars)

    static func normalized(_ text: [Unicode.Scalar]) -> [Unicode.Scalar] {
        let s = PythonText.lower(text).filter { !punctuation.contains($0) }
        // re.sub(r"\b(a|an|the)\b", " ", s): at each position the alternatives in order, each needing a word boundary
        // on both sides (a boundary: exactly one side is a word character; outside the text is not).
        func word(_ i: Int) -> Bool { i >= 0 && i < s.count && PythonText.isWordCharacter(s[i]) }
        func boundary(_ i: Int) -> Bool { word(i - 1) != word(i) }
        let articles: [[Unicode.Scalar]] = [["a"], ["a", "n"], ["t", "h", "e"]]
        var out: [Unicode.Scalar] = []
        var i = 0
        scan: while i < s.count {
            if boundary(i) {
                for article in articles where i + article.count <= s.count && s[i..<(i + article.count)].elementsEqual(article)
                    && boundary(i + article.count) {
                    out.append(" ")
                    i += article.count
                    continue scan
                }
            }
            out.append(s[i])
            i += 1
        }
        return Array(PythonText.split(out).joined(separator: [" "]))
    }

    /// 1 when the answer's normalised label equals a normalised reference, else 0.
    public static func score(prediction: String, references: [String]) -> Double {
        let predicted = normalized(PythonText.scalars(label(of: prediction)))
        return references.contains { normalized(PythonText.scalars($0)) == predicted } ? 1 : 0
    }
}

// MARK: - The metrics by name

/// A task metric of generated answers, by the name users give it (`--metric`, `metric_for_best_model`).
public enum TaskMetric: String, CaseIterable, Sendable {
    case exactMatch = "exact_match"
    case rougeL = "rouge_l"
    case bleu
    case accuracy

    /// Every metric here is better when larger.
    public var greaterIsBetter: Bool { true }

    /// The key in metrics.jsonl, TensorBoard (eval/<name>) and eval's JSON: transformers' "eval_" prefix.
    public var evalKey: String { "eval_" + rawValue }

    /// Accepts the names and a few spellings users type (rougeL, rouge-l, em, sacrebleu), any case.
    public static func parse(_ name: String) -> TaskMetric? {
        let key = name.lowercased().replacing("-", with: "_")
        let stripped = key.hasPrefix("eval_") ? String(key.dropFirst(5)) : key
        switch stripped {
        case "exact_match", "em", "exactmatch": return .exactMatch
        case "rouge_l", "rougel": return .rougeL
        case "bleu", "sacrebleu": return .bleu
        case "accuracy", "acc": return .accuracy
        default: return nil
        }
    }

    /// A comma-separated list (`--metric exact_match,rouge_l`); `option` names where it came from in the error.
    public static func parseList(_ text: String, option: String) throws -> [TaskMetric] {
        var out: [TaskMetric] = []
        for part in text.split(separator: ",").map({ $0.filter { !$0.isWhitespace } }) where !part.isEmpty {
            guard let metric = parse(part) else {
                throw UsageError("\(option): unknown metric '\(part)'; expected \(allCases.map(\.rawValue).joined(separator: ", "))")
            }
            if !out.contains(metric) { out.append(metric) }
        }
        guard !out.isEmpty else { throw UsageError("\(option): no metric named; expected \(allCases.map(\.rawValue).joined(separator: ", "))") }
        return out
    }

    /// The example's score: 0/1 for exact match and accuracy, ROUGE-L F, sentence BLEU (0-100).
    public func score(prediction: String, references: [String]) -> Double {
        switch self {
        case .exactMatch: ExactMatch.score(prediction: prediction, references: references)
        case .rougeL: RougeL.score(prediction: prediction, references: references).fmeasure
        case .bleu: SacreBLEU.sentenceScore(hypothesis: prediction, references: references).score
        case .accuracy: LabelAccuracy.score(prediction: prediction, references: references)
        }
    }

    /// The metric over a set of answers: the mean of the examples' scores, except BLEU, which is corpus BLEU.
    /// nil when there are no answers.
    public func aggregate(predictions: [String], references: [[String]], perExample: [Double]) -> Double? {
        guard !predictions.isEmpty else { return nil }
        if self == .bleu { return SacreBLEU.corpusScore(hypotheses: predictions, references: references).score }
        return perExample.reduce(0, +) / Double(perExample.count)
    }
}
