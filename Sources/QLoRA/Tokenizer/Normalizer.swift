// tokenizer.json normalizers: text transformations applied before pre-tokenization.
//
// Supported: Sequence, Prepend, Replace (String or Regex pattern), Lowercase, Strip, NFC, NFD.
// Llama 2 / Mistral files use Sequence[Prepend("▁"), Replace(" " → "▁")].

@_spi(_Unicode) import Swift

indirect enum Normalizer: @unchecked Sendable {
    case sequence([Normalizer])
    case prepend([UInt8])
    case replace(SplitPattern, content: [UInt8])
    case lowercase
    case strip(left: Bool, right: Bool)
    case nfc
    case nfd

    init(json: JSONValue, file: String, place: String) throws {
        func fail(_ message: String) -> FileFormatError { FileFormatError(file: file, place: place, message) }
        guard let type = json["type"]?.string else { throw fail("expected an object with a \"type\"") }
        switch type {
        case "Sequence":
            guard let list = json["normalizers"]?.array else { throw fail("Sequence needs a \"normalizers\" array") }
            self = .sequence(try list.enumerated().map { try Normalizer(json: $1, file: file, place: "\(place).normalizers[\($0)]") })
        case "Prepend":
            guard let s = json["prepend"]?.string else { throw fail("Prepend needs a \"prepend\" string") }
            self = .prepend(Array(s.utf8))
        case "Replace":
            guard let content = json["content"]?.string else { throw fail("Replace needs a \"content\" string") }
            self = .replace(try parsePattern(json["pattern"], file: file, place: "\(place).pattern"), content: Array(content.utf8))
        case "Lowercase":
            self = .lowercase
        case "Strip":
            self = .strip(left: json["strip_left"]?.bool ?? true, right: json["strip_right"]?.bool ?? true)
        case "NFC":
            self = .nfc
        case "NFD":
            self = .nfd
        default:
            throw fail("unsupported normalizer type \"\(type)\" (supported: Sequence, Prepend, Replace, Lowercase, Strip, NFC, NFD)")
        }
    }

    /// Normalizes one piece of text (UTF-8).
    func apply(_ text: [UInt8]) -> [UInt8] {
        switch self {
        case .sequence(let list):
            return list.reduce(text) { $1.apply($0) }
        case .prepend(let p):
            return text.isEmpty ? text : p + text
        case .replace(let pattern, let content):
            let matches = pattern.matches(in: text)
            if matches.isEmpty { return text }
            var out: [UInt8] = []
            var start = 0
            for m in matches {
                out.append(contentsOf: text[start..<m.lowerBound])
                out.append(contentsOf: content)
                start = m.upperBound
            }
            out.append(contentsOf: text[start...])
            return out
        case .lowercase:
            return Array(String(decoding: text, as: UTF8.self).lowercased().utf8)
        case .strip(let left, let right):
            return text.withUnsafeBufferPointer { b in
                var lo = 0, hi = b.count
                if left {
                    while lo < hi {
                        let (v, l) = UnicodeText.scalar(b, lo)
                        if !UnicodeText.isWhitespace(v) { break }
                        lo += l
                    }
                }
                if right {
                    while hi > lo {
                        let p = UnicodeText.previousScalarStart(b, before: hi)
                        if !UnicodeText.isWhitespace(UnicodeText.scalar(b, p).value) { break }
                        hi = p
                    }
                }
                return Array(b[lo..<hi])
            }
        case .nfc:
            return String(decoding: text, as: UTF8.self)._nfcCodeUnits
        case .nfd:
            var out: [UInt8] = []
            for s in String(decoding: text, as: UTF8.self)._nfd { out.append(contentsOf: String(Character(s)).utf8) }
            return out
        }
    }
}

/// A tokenizer.json pattern: `{"String": "..."}` or `{"Regex": "..."}`.
func parsePattern(_ json: JSONValue?, file: String, place: String) throws -> SplitPattern {
    if let s = json?["String"]?.string {
        guard !s.isEmpty else { throw FileFormatError(file: file, place: place, "the String pattern is empty") }
        return .literal(Array(s.utf8))
    }
    if let r = json?["Regex"]?.string {
        do {
            return try SplitPattern.regex(r)
        } catch {
            throw FileFormatError(file: file, place: place, "cannot compile regex \(r): \(error)")
        }
    }
    throw FileFormatError(file: file, place: place, "expected {\"String\": ...} or {\"Regex\": ...}")
}
