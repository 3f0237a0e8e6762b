// tokenizer.json decoders: turn token strings back into text.
//
// Each decoder maps a list of tokens to a list of tokens (tokenizers' `decode_chain`); the results are
// concatenated. Tokens are UTF-8 bytes here; the final bytes become a String with invalid sequences
// replaced by U+FFFD, as Rust's `from_utf8_lossy` does.
// Supported: ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence.
// Llama 2: Sequence[Replace("▁" → " "), ByteFallback, Fuse, Strip(" ", 1, 0)].

indirect enum TokenDecoder: @unchecked Sendable {
    case byteLevel
    case replace(SplitPattern, content: [UInt8])
    case byteFallback
    case fuse
    case strip(content: UInt32, start: Int, stop: Int)
    case metaspace(replacement: UInt32, prependScheme: PrependScheme)
    case sequence([TokenDecoder])

    init(json: JSONValue, file: String, place: String) throws {
        func fail(_ message: String) -> FileFormatError { FileFormatError(file: file, place: place, message) }
        guard let type = json["type"]?.string else { throw fail("expected an object with a \"type\"") }
        switch type {
        case "ByteLevel":
            self = .byteLevel
        case "Replace":
            guard let content = json["content"]?.string else { throw fail("Replace needs a \"content\" string") }
            self = .replace(try parsePattern(json["pattern"], file: file, place: "\(place).pattern"), content: Array(content.utf8))
        case "ByteFallback":
            self = .byteFallback
        case "Fuse":
            self = .fuse
        case "Strip":
            guard let c = json["content"]?.string, c.unicodeScalars.count == 1, let scalar = c.unicodeScalars.first else {
                throw fail("Strip needs a one-character \"content\"")
            }
            self = .strip(content: scalar.value, start: json["start"]?.int ?? 0, stop: json["stop"]?.int ?? 0)
        case "Metaspace":
            let (scalar, scheme) = try PrependScheme.metaspaceSettings(json, fail: fail)
            self = .metaspace(replacement: scalar, prependScheme: scheme)
        case "Sequence":
            guard let list = json["decoders"]?.array else { throw fail("Sequence needs a \"decoders\" array") }
            self = .sequence(try list.enumerated().map { try TokenDecoder(json: $1, file: file, place: "\(place).decoders[\($0)]") })
        default:
            throw fail("unsupported decoder type \"\(type)\" (supported: ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence)")
        }
    }

    private static let replacementCharacter: [UInt8] = [0xEF, 0xBF, 0xBD]

    /// One step of the chain.
    func decodeChain(_ tokens: [[UInt8]]) -> [[UInt8]] {
        switch self {
        case .sequence(let list):
            return list.reduce(tokens) { $1.decodeChain($0) }
        case .byteLevel:
            var out: [UInt8] = []
            for t in tokens { out.append(contentsOf: ByteLevel.decode(t) ?? t) }
            // from_utf8_lossy happens here in tokenizers; the final String conversion does the same.
            return [out]
        case .replace(let pattern, let content):
            return tokens.map { Normalizer.replace(pattern, content: content).apply($0) }
        case .byteFallback:
            var out: [[UInt8]] = []
            var pending: [UInt8] = []
            func flush() {
                if pending.isEmpty { return }
                if String(validating: pending, as: UTF8.self) != nil {
                    out.append(pending)
                } else {
                    for _ in pending { out.append(Self.replacementCharacter) }
                }
                pending.removeAll()
            }
            for t in tokens {
                if let b = Self.byteToken(t) {
                    pending.append(b)
                } else {
                    flush()
                    out.append(t)
                }
            }
            flush()
            return out
        case .fuse:
            return [tokens.flatMap { $0 }]
        case .strip(let content, let start, let stop):
            return tokens.map { t in
                let scalars = Self.scalars(t)
                var lo = 0
                while lo < min(start, scalars.count) && scalars[lo].value == content { lo += 1 }
                var hi = scalars.count
                var removed = 0
                while removed < stop && hi > lo && scalars[hi - 1].value == content { hi -= 1; removed += 1 }
                return scalars[lo..<hi].flatMap { $0.bytes }
            }
        case .metaspace(let replacement, let scheme):
            return tokens.enumerated().map { i, t in
                var out: [UInt8] = []
                for s in Self.scalars(t) {
                    if s.value == replacement {
                        if i == 0 && scheme != .never { continue }
                        out.append(0x20)
                    } else {
                        out.append(contentsOf: s.bytes)
                    }
                }
                return out
            }
        }
    }

    /// `<0xNN>` → the byte.
    private static func byteToken(_ t: [UInt8]) -> UInt8? {
        guard t.count == 6, t[0] == UInt8(ascii: "<"), t[1] == UInt8(ascii: "0"), t[2] == UInt8(ascii: "x"),
              t[5] == UInt8(ascii: ">") else { return nil }
        return UInt8(String(decoding: t[3..<5], as: UTF8.self), radix: 16)
    }

    private static func scalars(_ t: [UInt8]) -> [(value: UInt32, bytes: ArraySlice<UInt8>)] {
        t.withUnsafeBufferPointer { b in
            var out: [(value: UInt32, bytes: ArraySlice<UInt8>)] = []
            var i = 0
            while i < b.count {
                let (v, l) = UnicodeText.scalar(b, i)
                out.append((v, t[i..<(i + l)]))
                i += l
            }
            return out
        }
    }
}
