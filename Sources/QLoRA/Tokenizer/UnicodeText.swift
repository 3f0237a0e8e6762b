// Low-level text helpers for the tokenizer: UTF-8 scalar decoding and the character classes that
// tokenizer.json regexes and pre-tokenizers use.
//
// Everything in the tokenizer works on UTF-8 bytes, never on Swift `String` comparison: Swift compares
// and hashes strings by canonical equivalence ("é" == "e\u{301}"), while tokenizers compares bytes.

/// The class of a Unicode scalar for the split regexes: `\p{L}`, `\p{N}`, `\s`, or anything else.
enum ScalarClass: UInt8 {
    case letter = 0, number = 1, whitespace = 2, other = 3
}

enum UnicodeText {
    /// Decodes the scalar that starts at `i` in well-formed UTF-8; returns its value and length in bytes.
    @inline(__always)
    static func scalar(_ b: UnsafeBufferPointer<UInt8>, _ i: Int) -> (value: UInt32, length: Int) {
        let b0 = UInt32(b[i])
        if b0 < 0x80 { return (b0, 1) }
        let n = b.count
        if b0 < 0xE0 {
            guard i + 1 < n else { return (0xFFFD, 1) }
            return ((b0 & 0x1F) << 6 | UInt32(b[i + 1] & 0x3F), 2)
        }
        if b0 < 0xF0 {
            guard i + 2 < n else { return (0xFFFD, n - i) }
            return ((b0 & 0x0F) << 12 | UInt32(b[i + 1] & 0x3F) << 6 | UInt32(b[i + 2] & 0x3F), 3)
        }
        guard i + 3 < n else { return (0xFFFD, n - i) }
        return ((b0 & 0x07) << 18 | UInt32(b[i + 1] & 0x3F) << 12 | UInt32(b[i + 2] & 0x3F) << 6 | UInt32(b[i + 3] & 0x3F), 4)
    }

    /// The byte offset where the scalar ending just before `end` starts.
    @inline(__always)
    static func previousScalarStart(_ b: UnsafeBufferPointer<UInt8>, before end: Int) -> Int {
        var p = end - 1
        while p > 0 && b[p] & 0xC0 == 0x80 { p -= 1 }
        return p
    }

    /// Class table for the Basic Multilingual Plane, built once (65,536 property look-ups, a few ms).
    private static let bmpClasses: [UInt8] = {
        var table = [UInt8](repeating: ScalarClass.other.rawValue, count: 0x10000)
        for v in 0..<0x10000 {
            if let s = Unicode.Scalar(UInt32(v)) { table[v] = computeClass(s).rawValue }
        }
        return table
    }()

    private static func computeClass(_ s: Unicode.Scalar) -> ScalarClass {
        let p = s.properties
        if p.isWhitespace { return .whitespace }
        switch p.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return .letter
        case .decimalNumber, .letterNumber, .otherNumber: return .number
        default: return .other
        }
    }

    /// `\p{L}` / `\p{N}` / `\s` (Unicode White_Space) / other, as Oniguruma classifies a scalar.
    @inline(__always)
    static func classify(_ v: UInt32) -> ScalarClass {
        if v < 0x10000 { return ScalarClass(rawValue: bmpClasses[Int(v)]) ?? .other }
        guard let s = Unicode.Scalar(v) else { return .other }
        return computeClass(s)
    }

    /// Rust's `char::is_whitespace` (the White_Space property).
    static func isWhitespace(_ v: UInt32) -> Bool { classify(v) == .whitespace }

    /// Rust's `char::is_numeric` (general categories Nd, Nl, No).
    static func isNumeric(_ v: UInt32) -> Bool { classify(v) == .number }

    /// Rust's `char::is_alphanumeric` (Alphabetic or Numeric).
    static func isAlphanumeric(_ v: UInt32) -> Bool {
        guard let s = Unicode.Scalar(v) else { return false }
        return s.properties.isAlphabetic || classify(v) == .number
    }

    /// tokenizers' `is_punc`: ASCII punctuation or a Unicode P* category.
    static func isPunctuation(_ v: UInt32) -> Bool {
        if v < 0x80 {
            let c = UInt8(v)
            return (0x21...0x2F).contains(c) || (0x3A...0x40).contains(c) || (0x5B...0x60).contains(c) || (0x7B...0x7E).contains(c)
        }
        guard let s = Unicode.Scalar(v) else { return false }
        switch s.properties.generalCategory {
        case .connectorPunctuation, .dashPunctuation, .openPunctuation, .closePunctuation,
             .initialPunctuation, .finalPunctuation, .otherPunctuation: return true
        default: return false
        }
    }

    /// The UTF-8 bytes of one scalar.
    static func utf8(_ v: UInt32) -> [UInt8] {
        guard let s = Unicode.Scalar(v) else { return [0xEF, 0xBF, 0xBD] }
        return Array(String(Character(s)).utf8)
    }

    /// Byte-exact search for `needle` in `hay` from `from`; returns the start offset.
    static func find(_ needle: [UInt8], in hay: [UInt8], from: Int = 0) -> Int? {
        guard !needle.isEmpty, hay.count >= needle.count else { return nil }
        let first = needle[0]
        var i = from
        let last = hay.count - needle.count
        while i <= last {
            if hay[i] == first {
                var k = 1
                while k < needle.count && hay[i + k] == needle[k] { k += 1 }
                if k == needle.count { return i }
            }
            i += 1
        }
        return nil
    }

    /// Replaces every non-overlapping occurrence of `pattern` (left to right) with `content`.
    static func replaceAll(_ pattern: [UInt8], with content: [UInt8], in bytes: [UInt8]) -> [UInt8] {
        guard !pattern.isEmpty, var next = find(pattern, in: bytes) else { return bytes }
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count + 8)
        var start = 0
        while true {
            out.append(contentsOf: bytes[start..<next])
            out.append(contentsOf: content)
            start = next + pattern.count
            guard let n = find(pattern, in: bytes, from: start) else { break }
            next = n
        }
        out.append(contentsOf: bytes[start...])
        return out
    }
}

/// Bytes as a dictionary key, hashed and compared byte for byte.
struct ByteString: Hashable {
    var bytes: [UInt8]
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    init(_ string: String) { self.bytes = Array(string.utf8) }
    func hash(into hasher: inout Hasher) {
        bytes.withUnsafeBytes { hasher.combine(bytes: $0) }
    }
    static func == (a: ByteString, b: ByteString) -> Bool { a.bytes == b.bytes }
    var string: String { String(decoding: bytes, as: UTF8.self) }
}
