// tokenizer.json pre-tokenizers: split normalized text into words that BPE encodes one by one.
//
// Supported: ByteLevel, Split, Digits, Metaspace, Whitespace, WhitespaceSplit, Punctuation, Sequence.
// Splitting follows tokenizers' `SplitDelimiterBehavior`; empty pieces are dropped.

/// One piece of text on its way through the pipeline.
struct Piece {
    /// Normalized UTF-8 bytes.
    var bytes: [UInt8]
    /// Whether the piece begins where the input text begins (Metaspace `prepend_scheme: "first"`).
    var atTextStart: Bool
}

/// Metaspace's rule for adding the replacement character in front of a piece.
enum PrependScheme: String {
    case always, first, never

    /// The replacement character and prepend scheme of a `Metaspace` pre-tokenizer or decoder
    /// (`add_prefix_space` is the older spelling of the scheme).
    static func metaspaceSettings(_ json: JSONValue, fail: (String) -> Error) throws -> (replacement: UInt32, scheme: PrependScheme) {
        let rep = json["replacement"]?.string ?? "▁"
        guard rep.unicodeScalars.count == 1, let scalar = rep.unicodeScalars.first else {
            throw fail("Metaspace replacement must be one character")
        }
        var scheme = PrependScheme.always
        if let s = json["prepend_scheme"]?.string {
            guard let p = PrependScheme(rawValue: s) else { throw fail("unknown prepend_scheme \"\(s)\"") }
            scheme = p
        } else if let add = json["add_prefix_space"]?.bool {
            scheme = add ? .always : .never
        }
        return (scalar.value, scheme)
    }
}

indirect enum PreTokenizer: @unchecked Sendable {
    case byteLevel(addPrefixSpace: Bool, useRegex: Bool)
    case split(SplitPattern, SplitBehavior, invert: Bool)
    case digits(individual: Bool)
    case metaspace(replacement: UInt32, prepend: PrependScheme, split: Bool)
    case whitespace
    case whitespaceSplit
    case punctuation(SplitBehavior)
    case sequence([PreTokenizer])

    init(json: JSONValue, file: String, place: String) throws {
        func fail(_ message: String) -> FileFormatError { FileFormatError(file: file, place: place, message) }
        guard let type = json["type"]?.string else { throw fail("expected an object with a \"type\"") }
        func behavior(_ key: String, default d: SplitBehavior) throws -> SplitBehavior {
            guard let s = json[key]?.string else { return d }
            guard let b = SplitBehavior(rawValue: s) else { throw fail("unknown \(key) \"\(s)\"") }
            return b
        }
        switch type {
        case "ByteLevel":
            self = .byteLevel(addPrefixSpace: json["add_prefix_space"]?.bool ?? true, useRegex: json["use_regex"]?.bool ?? true)
        case "Split":
            let pattern = try parsePattern(json["pattern"], file: file, place: "\(place).pattern")
            guard json["behavior"]?.string != nil else { throw fail("Split needs a \"behavior\"") }
            self = .split(pattern, try behavior("behavior", default: .isolated), invert: json["invert"]?.bool ?? false)
        case "Digits":
            self = .digits(individual: json["individual_digits"]?.bool ?? false)
        case "Metaspace":
            let (scalar, scheme) = try PrependScheme.metaspaceSettings(json, fail: fail)
            self = .metaspace(replacement: scalar, prepend: scheme, split: json["split"]?.bool ?? true)
        case "Whitespace":
            self = .whitespace
        case "WhitespaceSplit":
            self = .whitespaceSplit
        case "Punctuation":
            self = .punctuation(try behavior("behavior", default: .isolated))
        case "Sequence":
            guard let list = json["pretokenizers"]?.array else { throw fail("Sequence needs a \"pretokenizers\" array") }
            self = .sequence(try list.enumerated().map { try PreTokenizer(json: $1, file: file, place: "\(place).pretokenizers[\($0)]") })
        default:
            throw fail("unsupported pre-tokenizer type \"\(type)\" (supported: ByteLevel, Split, Digits, Metaspace, Whitespace, WhitespaceSplit, Punctuation, Sequence)")
        }
    }

    /// Oniguruma's `\w`: Alphabetic, marks, decimal digits, connector punctuation, joiners.
    private static func isWordScalar(_ v: UInt32) -> Bool {
        if v < 0x80 {
            let c = UInt8(v)
            return (0x30...0x39).contains(c) || (0x41...0x5A).contains(c) || (0x61...0x7A).contains(c) || c == 0x5F
        }
        if v == 0x200C || v == 0x200D { return true }
        guard let s = Unicode.Scalar(v) else { return false }
        if s.properties.isAlphabetic { return true }
        switch s.properties.generalCategory {
        case .nonspacingMark, .spacingMark, .enclosingMark, .decimalNumber, .connectorPunctuation: return true
        default: return false
        }
    }

    /// Matches of `\w+|[^\w\s]+` (the Whitespace pre-tokenizer's regex).
    private static func wordMatches(_ text: [UInt8]) -> [Range<Int>] {
        text.withUnsafeBufferPointer { b in
            var out: [Range<Int>] = []
            var i = 0
            while i < b.count {
                let (v, l) = UnicodeText.scalar(b, i)
                if UnicodeText.isWhitespace(v) { i += l; continue }
                let word = isWordScalar(v)
                var j = i + l
                while j < b.count {
                    let (v2, l2) = UnicodeText.scalar(b, j)
                    if UnicodeText.isWhitespace(v2) || isWordScalar(v2) != word { break }
                    j += l2
                }
                out.append(i..<j)
                i = j
            }
            return out
        }
    }

    /// Splits every piece, in order.
    func apply(_ pieces: [Piece]) -> [Piece] {
        if case .sequence(let list) = self { return list.reduce(pieces) { $1.apply($0) } }
        var out: [Piece] = []
        out.reserveCapacity(pieces.count)
        // Empty pieces are never pre-tokenized (tokenizers drops them before, so no prefix space is added).
        for piece in pieces where !piece.bytes.isEmpty { apply(piece, into: &out) }
        return out
    }

    private func splitPiece(_ piece: Piece, _ ranges: [Range<Int>], into out: inout [Piece]) {
        if ranges.count == 1 && ranges[0].count == piece.bytes.count {
            out.append(piece)
            return
        }
        for r in ranges {
            out.append(Piece(bytes: Array(piece.bytes[r]), atTextStart: piece.atTextStart && r.lowerBound == 0))
        }
    }

    private func apply(_ piece: Piece, into out: inout [Piece]) {
        let bytes = piece.bytes
        switch self {
        case .sequence:
            out.append(contentsOf: apply([piece]))
        case .byteLevel(let addPrefixSpace, let useRegex):
            var text = bytes
            if addPrefixSpace && text.first != 0x20 { text.insert(0x20, at: 0) }
            let ranges = useRegex
                ? Splitting.pieces(count: text.count, matches: SplitPattern.gpt2.matches(in: text), behavior: .isolated)
                : (text.isEmpty ? [] : [0..<text.count])
            for r in ranges {
                out.append(Piece(bytes: ByteLevel.encode(Array(text[r])), atTextStart: piece.atTextStart && r.lowerBound == 0))
            }
        case .split(let pattern, let behavior, let invert):
            splitPiece(piece, Splitting.pieces(count: bytes.count, matches: pattern.matches(in: bytes), behavior: behavior, invert: invert), into: &out)
        case .digits(let individual):
            let matches = Splitting.scalarMatches(bytes, UnicodeText.isNumeric)
            splitPiece(piece, Splitting.pieces(count: bytes.count, matches: matches, behavior: individual ? .isolated : .contiguous), into: &out)
        case .metaspace(let replacement, let prepend, let split):
            let rep = UnicodeText.utf8(replacement)
            var text = UnicodeText.replaceAll([0x20], with: rep, in: bytes)
            let shouldPrepend: Bool
            switch prepend {
            case .always: shouldPrepend = true
            case .first: shouldPrepend = piece.atTextStart
            case .never: shouldPrepend = false
            }
            if shouldPrepend && !text.starts(with: rep) { text = rep + text }
            let moved = Piece(bytes: text, atTextStart: piece.atTextStart)
            if split {
                let matches = SplitPattern.literal(rep).matches(in: text)
                splitPiece(moved, Splitting.pieces(count: text.count, matches: matches, behavior: .mergedWithNext), into: &out)
            } else if !text.isEmpty {
                out.append(moved)
            }
        case .whitespace:
            splitPiece(piece, Splitting.pieces(count: bytes.count, matches: Self.wordMatches(bytes), behavior: .removed, invert: true), into: &out)
        case .whitespaceSplit:
            let matches = Splitting.scalarMatches(bytes, UnicodeText.isWhitespace)
            splitPiece(piece, Splitting.pieces(count: bytes.count, matches: matches, behavior: .removed), into: &out)
        case .punctuation(let behavior):
            let matches = Splitting.scalarMatches(bytes, UnicodeText.isPunctuation)
            splitPiece(piece, Splitting.pieces(count: bytes.count, matches: matches, behavior: behavior), into: &out)
        }
    }
}
