// Added tokens (tokenizer.json "added_tokens"): special tokens such as <|im_start|> and any tokens
// added after training. They are found in the text before pre-tokenization and never split.
//
// As in tokenizers: tokens with `normalized: false` are matched in the raw text first; the pieces
// between them are normalized, and tokens with `normalized: true` (their content normalized too) are
// matched in those. Matching is leftmost-longest. `single_word` keeps a match only when no letter or
// digit touches it; `lstrip` / `rstrip` make the token swallow the whitespace before / after it.

/// One entry of "added_tokens".
public struct AddedToken: Sendable, Equatable {
    public let id: Int
    public let content: String
    public let special: Bool
    public let singleWord: Bool
    public let lstrip: Bool
    public let rstrip: Bool
    public let normalized: Bool
}

/// A byte trie for leftmost-longest matching of a set of token strings.
struct TokenMatcher {
    private var children: [[UInt8: Int32]] = [[:]]
    private var terminal: [Int] = [-1]  // index into `tokens`, or -1
    private var firstBytes = [Bool](repeating: false, count: 256)
    private(set) var isEmpty = true

    mutating func insert(_ bytes: [UInt8], value: Int) {
        guard let first = bytes.first else { return }
        firstBytes[Int(first)] = true
        isEmpty = false
        var node = 0
        for b in bytes {
            if let child = children[node][b] {
                node = Int(child)
            } else {
                children.append([:])
                terminal.append(-1)
                children[node][b] = Int32(children.count - 1)
                node = children.count - 1
            }
        }
        // The first token with this content keeps it.
        if terminal[node] < 0 { terminal[node] = value }
    }

    /// The leftmost-longest matches, non-overlapping, left to right: (range, value).
    func matches(in text: [UInt8]) -> [(Range<Int>, Int)] {
        if isEmpty { return [] }
        var out: [(Range<Int>, Int)] = []
        var i = 0
        while i < text.count {
            if !firstBytes[Int(text[i])] { i += 1; continue }
            var node = 0, j = i
            var best: (end: Int, value: Int)? = nil
            while j < text.count, let child = children[node][text[j]] {
                node = Int(child)
                j += 1
                if terminal[node] >= 0 { best = (j, terminal[node]) }
            }
            if let best {
                out.append((i..<best.end, best.value))
                i = best.end
            } else {
                i += 1
            }
        }
        return out
    }
}

/// Splits text around added tokens.
struct AddedVocabulary {
    let tokens: [AddedToken]
    /// The string each added token decodes from: its content, normalized when `normalized` is set
    /// (tokenizers hands the decoder the normalized form, e.g. "▁foo▁bar" for "foo bar").
    private(set) var decodeForms: [Int: [UInt8]] = [:]
    private var rawMatcher = TokenMatcher()
    private var normalizedMatcher = TokenMatcher()

    init(tokens: [AddedToken], normalizer: Normalizer?) {
        self.tokens = tokens
        for (index, t) in tokens.enumerated() {
            if t.normalized {
                let content = Array(t.content.utf8)
                let normalized = normalizer?.apply(content) ?? content
                normalizedMatcher.insert(normalized, value: index)
                decodeForms[t.id] = normalized
            } else {
                rawMatcher.insert(Array(t.content.utf8), value: index)
                decodeForms[t.id] = Array(t.content.utf8)
            }
        }
    }

    /// A piece of the input: an added token's id, or text still to be tokenized.
    enum Segment {
        case token(Int)
        case text(Piece)
    }

    /// Raw text → segments with normalized text pieces (tokenizers' `extract_and_normalize`).
    func split(_ text: [UInt8], normalizer: Normalizer?) -> [Segment] {
        var out: [Segment] = []
        for segment in split(Piece(bytes: text, atTextStart: true), matcher: rawMatcher) {
            guard case .text(let piece) = segment else { out.append(segment); continue }
            let normalized = Piece(bytes: normalizer?.apply(piece.bytes) ?? piece.bytes, atTextStart: piece.atTextStart)
            out.append(contentsOf: split(normalized, matcher: normalizedMatcher))
        }
        return out
    }

    /// tokenizers' `find_matches` + split, including the single_word / lstrip / rstrip rules.
    private func split(_ piece: Piece, matcher: TokenMatcher) -> [Segment] {
        let text = piece.bytes
        let found = matcher.matches(in: text)
        if found.isEmpty { return text.isEmpty ? [] : [.text(piece)] }
        var out: [Segment] = []
        func emitText(_ r: Range<Int>) {
            if !r.isEmpty {
                out.append(.text(Piece(bytes: Array(text[r]), atTextStart: piece.atTextStart && r.lowerBound == 0)))
            }
        }
        text.withUnsafeBufferPointer { b in
            var startOffset = 0
            for (range, index) in found {
                let token = tokens[index]
                var start = range.lowerBound, stop = range.upperBound
                if token.singleWord {
                    let startSpace = start == 0 || !Self.endsWithWord(b, start)
                    let stopSpace = stop == b.count || !UnicodeText.isAlphanumeric(UnicodeText.scalar(b, stop).value)
                    if !startSpace || !stopSpace { continue }
                }
                if token.lstrip {
                    var s = start
                    while s > 0 {
                        let p = UnicodeText.previousScalarStart(b, before: s)
                        if !UnicodeText.isWhitespace(UnicodeText.scalar(b, p).value) { break }
                        s = p
                    }
                    // Whitespace that a previous token already took stays with it.
                    start = max(s, startOffset)
                }
                if token.rstrip {
                    while stop < b.count {
                        let (v, l) = UnicodeText.scalar(b, stop)
                        if !UnicodeText.isWhitespace(v) { break }
                        stop += l
                    }
                }
                if startOffset < start { emitText(startOffset..<start) }
                out.append(.token(token.id))
                startOffset = stop
            }
            if startOffset < b.count { emitText(startOffset..<b.count) }
        }
        return out
    }

    private static func endsWithWord(_ b: UnsafeBufferPointer<UInt8>, _ end: Int) -> Bool {
        let p = UnicodeText.previousScalarStart(b, before: end)
        return UnicodeText.isAlphanumeric(UnicodeText.scalar(b, p).value)
    }
}
