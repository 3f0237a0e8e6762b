// Finding the matches of a tokenizer.json split pattern in UTF-8 text.
//
// tokenizer.json regexes are Oniguruma syntax. The few that real Llama-family tokenizers use are
// recognised by their exact text and matched by hand-written scanners (much faster than a general
// engine); any other regex goes to Swift's Regex with Unicode-scalar semantics.
//
// Known patterns:
//   GPT-2 (ByteLevel use_regex, SmolLM, GPT-2/RoBERTa):
//     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   Llama 3 (and Qwen 2 with \p{N} instead of \p{N}{1,3}):
//     (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// Each scanner returns, at a position, where the leftmost-first match starting there ends. These
// patterns match at every position (every scalar is a letter, a number, a space or "other"), so
// the matches tile the text.

/// A pattern from a `Split` pre-tokenizer, `Replace` normalizer or the ByteLevel pre-tokenizer.
enum SplitPattern: @unchecked Sendable {
    case gpt2
    /// The Llama 3 pattern; `maxDigits` is 3 for Llama 3 and 1 for Qwen 2.
    case llama3(maxDigits: Int)
    /// A literal string (tokenizer.json `{"String": ...}`).
    case literal([UInt8])
    /// Any other regex.
    case regex(Regex<AnyRegexOutput>, source: String)

    static let gpt2Source = #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#
    static let llama3Source = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
    static let qwen2Source = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#

    /// Builds the matcher for a regex; known patterns get a hand-written scanner.
    /// - Parameter forceGeneral: use Swift Regex even for a known pattern (for tests and measurements).
    static func regex(_ source: String, forceGeneral: Bool = false) throws -> SplitPattern {
        if !forceGeneral {
            switch source {
            case gpt2Source: return .gpt2
            case llama3Source: return .llama3(maxDigits: 3)
            case qwen2Source: return .llama3(maxDigits: 1)
            default: break
            }
        }
        let regex = try Regex(source).matchingSemantics(.unicodeScalar)
        return .regex(regex, source: source)
    }

    /// Non-empty matches in `text`, left to right, as byte ranges.
    func matches(in text: [UInt8]) -> [Range<Int>] {
        if text.isEmpty { return [] }
        switch self {
        case .gpt2: return text.withUnsafeBufferPointer { tile($0, Self.gpt2End) }
        case .llama3(let maxDigits):
            return text.withUnsafeBufferPointer { b in tile(b) { Self.llama3End($0, $1, maxDigits: maxDigits) } }
        case .literal(let needle):
            var out: [Range<Int>] = []
            var from = 0
            while let i = UnicodeText.find(needle, in: text, from: from) {
                out.append(i..<(i + needle.count))
                from = i + needle.count
            }
            return out
        case .regex(let regex, _):
            let string = String(decoding: text, as: UTF8.self)
            let utf8 = string.utf8
            var out: [Range<Int>] = []
            for m in string.matches(of: regex) {
                let lo = utf8.distance(from: utf8.startIndex, to: m.range.lowerBound)
                let hi = utf8.distance(from: utf8.startIndex, to: m.range.upperBound)
                if hi > lo { out.append(lo..<hi) }
            }
            return out
        }
    }

    private func tile(_ b: UnsafeBufferPointer<UInt8>, _ end: (UnsafeBufferPointer<UInt8>, Int) -> Int) -> [Range<Int>] {
        var out: [Range<Int>] = []
        out.reserveCapacity(b.count / 4 + 1)
        var i = 0
        while i < b.count {
            let e = end(b, i)
            out.append(i..<e)
            i = e
        }
        return out
    }

    // MARK: - Scanners

    @inline(__always)
    private static func run(_ b: UnsafeBufferPointer<UInt8>, from i: Int, of cls: ScalarClass) -> Int {
        var j = i
        while j < b.count {
            let (v, l) = UnicodeText.scalar(b, j)
            if UnicodeText.classify(v) != cls { break }
            j += l
        }
        return j
    }

    /// `\s+(?!\S)|\s+` at a whitespace scalar: the whole run if it reaches the end, else the run minus
    /// its last scalar (which the next token takes as its leading space), else the single scalar.
    @inline(__always)
    private static func whitespaceEnd(_ b: UnsafeBufferPointer<UInt8>, _ i: Int) -> Int {
        let k = run(b, from: i, of: .whitespace)
        if k == b.count { return k }
        let p = UnicodeText.previousScalarStart(b, before: k)
        return p > i ? p : k
    }

    /// 's|'t|'re|'ve|'m|'ll|'d, optionally ASCII-case-insensitive (with ſ folding to s, as Oniguruma does).
    @inline(__always)
    private static func contractionEnd(_ b: UnsafeBufferPointer<UInt8>, _ i: Int, ignoreCase: Bool) -> Int? {
        guard b[i] == UInt8(ascii: "'"), i + 1 < b.count else { return nil }
        var c1 = b[i + 1]
        if ignoreCase {
            if c1 >= 0x41 && c1 <= 0x5A { c1 |= 0x20 }
            // U+017F LATIN SMALL LETTER LONG S (C5 BF) case-folds to "s".
            if c1 == 0xC5, i + 2 < b.count, b[i + 2] == 0xBF { return i + 3 }
        }
        switch c1 {
        case UInt8(ascii: "s"), UInt8(ascii: "t"), UInt8(ascii: "m"), UInt8(ascii: "d"): return i + 2
        default: break
        }
        guard i + 2 < b.count else { return nil }
        var c2 = b[i + 2]
        if ignoreCase, c2 >= 0x41 && c2 <= 0x5A { c2 |= 0x20 }
        switch (c1, c2) {
        case (UInt8(ascii: "r"), UInt8(ascii: "e")), (UInt8(ascii: "v"), UInt8(ascii: "e")), (UInt8(ascii: "l"), UInt8(ascii: "l")):
            return i + 3
        default: return nil
        }
    }

    private static func gpt2End(_ b: UnsafeBufferPointer<UInt8>, _ i: Int) -> Int {
        if let e = contractionEnd(b, i, ignoreCase: false) { return e }
        let (v, l) = UnicodeText.scalar(b, i)
        // ` ?X+` for X in letters, numbers, other.
        if v == 0x20, i + 1 < b.count {
            let (v2, _) = UnicodeText.scalar(b, i + 1)
            let c2 = UnicodeText.classify(v2)
            if c2 != .whitespace { return run(b, from: i + 1, of: c2) }
        }
        let c = UnicodeText.classify(v)
        if c != .whitespace { return run(b, from: i + l, of: c) }
        return whitespaceEnd(b, i)
    }

    private static func llama3End(_ b: UnsafeBufferPointer<UInt8>, _ i: Int, maxDigits: Int) -> Int {
        if let e = contractionEnd(b, i, ignoreCase: true) { return e }
        let (v, l) = UnicodeText.scalar(b, i)
        let c = UnicodeText.classify(v)
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if c == .letter { return run(b, from: i + l, of: .letter) }
        if c != .number && v != 0x0A && v != 0x0D && i + l < b.count {
            let (v2, _) = UnicodeText.scalar(b, i + l)
            if UnicodeText.classify(v2) == .letter { return run(b, from: i + l, of: .letter) }
        }
        // \p{N}{1,maxDigits}
        if c == .number {
            var j = i + l, count = 1
            while count < maxDigits && j < b.count {
                let (v2, l2) = UnicodeText.scalar(b, j)
                if UnicodeText.classify(v2) != .number { break }
                j += l2
                count += 1
            }
            return j
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        var otherStart: Int? = c == .other ? i : nil
        if v == 0x20, i + 1 < b.count, UnicodeText.classify(UnicodeText.scalar(b, i + 1).value) == .other { otherStart = i + 1 }
        if let s = otherStart {
            var j = run(b, from: s, of: .other)
            while j < b.count && (b[j] == 0x0A || b[j] == 0x0D) { j += 1 }
            return j
        }
        // \s*[\r\n]+ : up to and including the last \r or \n of the whitespace run.
        let k = run(b, from: i, of: .whitespace)
        var p = k - 1
        while p >= i {
            if b[p] == 0x0A || b[p] == 0x0D { return p + 1 }
            p -= 1
        }
        return whitespaceEnd(b, i)
    }
}

/// How a split pre-tokenizer treats the matches (tokenizers' `SplitDelimiterBehavior`).
enum SplitBehavior: String {
    case removed = "Removed", isolated = "Isolated", mergedWithPrevious = "MergedWithPrevious",
         mergedWithNext = "MergedWithNext", contiguous = "Contiguous"
}

enum Splitting {
    /// Splits `count` bytes into pieces given the pattern matches, as tokenizers' `NormalizedString::split`
    /// does. Empty pieces are dropped.
    static func pieces(count: Int, matches: [Range<Int>], behavior: SplitBehavior, invert: Bool = false) -> [Range<Int>] {
        if count == 0 { return [] }
        // Tile the text into (range, isMatch).
        var tiles: [(Range<Int>, Bool)] = []
        tiles.reserveCapacity(matches.count * 2 + 1)
        var prev = 0
        for m in matches {
            if prev != m.lowerBound { tiles.append((prev..<m.lowerBound, invert)) }
            tiles.append((m, !invert))
            prev = m.upperBound
        }
        if prev != count { tiles.append((prev..<count, invert)) }

        var out: [(Range<Int>, Bool)] = []  // (range, remove)
        out.reserveCapacity(tiles.count)
        switch behavior {
        case .isolated:
            out = tiles.map { ($0.0, false) }
        case .removed:
            out = tiles
        case .contiguous:
            var previousMatch = false
            for (r, isMatch) in tiles {
                if isMatch == previousMatch, let last = out.last {
                    out[out.count - 1] = (last.0.lowerBound..<r.upperBound, false)
                } else {
                    out.append((r, false))
                }
                previousMatch = isMatch
            }
        case .mergedWithPrevious:
            var previousMatch = false
            for (r, isMatch) in tiles {
                if isMatch && !previousMatch, let last = out.last {
                    out[out.count - 1] = (last.0.lowerBound..<r.upperBound, false)
                } else {
                    out.append((r, false))
                }
                previousMatch = isMatch
            }
        case .mergedWithNext:
            var previousMatch = false
            for (r, isMatch) in tiles.reversed() {
                if isMatch && !previousMatch, let last = out.last {
                    out[out.count - 1] = (r.lowerBound..<last.0.upperBound, false)
                } else {
                    out.append((r, false))
                }
                previousMatch = isMatch
            }
            out.reverse()
        }
        return out.compactMap { $0.1 || $0.0.isEmpty ? nil : $0.0 }
    }

    /// Matches of a per-scalar predicate: each matching scalar is its own match (tokenizers' char patterns).
    static func scalarMatches(_ text: [UInt8], _ predicate: (UInt32) -> Bool) -> [Range<Int>] {
        text.withUnsafeBufferPointer { b in
            var out: [Range<Int>] = []
            var i = 0
            while i < b.count {
                let (v, l) = UnicodeText.scalar(b, i)
                if predicate(v) { out.append(i..<(i + l)) }
                i += l
            }
            return out
        }
    }
}
