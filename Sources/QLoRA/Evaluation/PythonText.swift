// The pieces of Python's `str` that the reference metric packages (rouge-score, sacrebleu, SQuAD's normalisation)
// lean on, so that our metrics split, strip and compare text as they do: strings are sequences of code points
// (no canonical equivalence: "é" and "e\u{301}" differ), and whitespace is what `str.isspace` says.

enum PythonText {
    /// `str.isspace()`: the characters Python's `split()`, `strip()` and `rstrip()` treat as whitespace
    /// (bidirectional class WS, B or S, or category Zs; this includes U+001C..U+001F, which Unicode's White_Space does not).
    static func isSpace(_ c: Unicode.Scalar) -> Bool {
        switch c.value {
        case 0x09...0x0D, 0x1C...0x20, 0x85, 0xA0, 0x1680, 0x2000...0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000: return true
        default: return false
        }
    }

    /// `str.split()` with no argument: runs of whitespace separate, none at the ends.
    static func split(_ s: [Unicode.Scalar]) -> [[Unicode.Scalar]] {
        var out: [[Unicode.Scalar]] = [], current: [Unicode.Scalar] = []
        for c in s {
            if isSpace(c) {
                if !current.isEmpty { out.append(current); current = [] }
            } else {
                current.append(c)
            }
        }
        if !current.isEmpty { out.append(current) }
        return out
    }

    /// `str.strip()`.
    static func strip(_ s: [Unicode.Scalar]) -> [Unicode.Scalar] {
        guard let first = s.firstIndex(where: { !isSpace($0) }), let last = s.lastIndex(where: { !isSpace($0) }) else { return [] }
        return Array(s[first...last])
    }

    /// `str.rstrip()`.
    static func rstrip(_ s: [Unicode.Scalar]) -> [Unicode.Scalar] {
        guard let last = s.lastIndex(where: { !isSpace($0) }) else { return [] }
        return Array(s[...last])
    }

    /// `str.splitlines()`: the line boundaries Python knows (\n, \r, \r\n, \v, \f, U+001C..U+001E, U+0085, U+2028, U+2029).
    static func splitLines(_ s: [Unicode.Scalar]) -> [[Unicode.Scalar]] {
        var out: [[Unicode.Scalar]] = [], current: [Unicode.Scalar] = []
        var i = 0
        while i < s.count {
            switch s[i].value {
            case 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029:
                out.append(current)
                current = []
                if s[i].value == 0x0D, i + 1 < s.count, s[i + 1].value == 0x0A { i += 1 }
            default:
                current.append(s[i])
            }
            i += 1
        }
        if !current.isEmpty { out.append(current) }
        return out
    }

    /// `str.lower()`: each code point's full lowercase mapping (İ becomes "i\u{307}", the Kelvin sign "k").
    /// Python's context rule for a final capital sigma is not applied; no metric here keeps a Greek letter where it matters.
    static func lower(_ s: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        out.reserveCapacity(s.count)
        for c in s {
            if c.isASCII {
                out.append(c.value >= 0x41 && c.value <= 0x5A ? Unicode.Scalar(c.value + 32)! : c)
            } else {
                out.append(contentsOf: c.properties.lowercaseMapping.unicodeScalars)
            }
        }
        return out
    }

    /// `\w` of Python's `re` on a str: letters, numbers (any numeric type) and "_".
    static func isWordCharacter(_ c: Unicode.Scalar) -> Bool {
        if c == "_" { return true }
        switch c.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return true
        default: return c.properties.numericType != nil
        }
    }

    static func scalars(_ s: String) -> [Unicode.Scalar] { Array(s.unicodeScalars) }

    static func string(_ s: [Unicode.Scalar]) -> String {
        var out = String.UnicodeScalarView()
        out.append(contentsOf: s)
        return String(out)
    }
}
