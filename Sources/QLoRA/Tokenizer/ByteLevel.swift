// GPT-2's byte-to-Unicode table (ByteLevel pre-tokenizer and decoder).
//
// Every byte maps to one printable character so that BPE works on strings: the printable bytes
// '!'..'~', '¡'..'¬' and '®'..'ÿ' map to the same code point; the other 68 bytes map, in order,
// to U+0100, U+0101, ... (so the space 0x20 becomes 'Ġ' U+0120 and '\n' becomes 'Ċ' U+010A).

enum ByteLevel {
    /// The code point that stands for each byte.
    static let byteToScalar: [UInt32] = {
        var table = [UInt32](repeating: 0, count: 256)
        var next: UInt32 = 256
        for b in 0..<256 {
            if (0x21...0x7E).contains(b) || (0xA1...0xAC).contains(b) || (0xAE...0xFF).contains(b) {
                table[b] = UInt32(b)
            } else {
                table[b] = next
                next += 1
            }
        }
        return table
    }()

    /// The UTF-8 encoding of each byte's character.
    static let byteToUTF8: [[UInt8]] = byteToScalar.map { UnicodeText.utf8($0) }

    /// The byte for each code point below 0x144 that stands for one; -1 for the others.
    static let scalarToByte: [Int16] = {
        var table = [Int16](repeating: -1, count: 0x144)
        for (b, s) in byteToScalar.enumerated() { table[Int(s)] = Int16(b) }
        return table
    }()

    /// Maps raw bytes to the UTF-8 of their byte-level characters.
    static func encode(_ bytes: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count + bytes.count / 2)
        for b in bytes { out.append(contentsOf: byteToUTF8[Int(b)]) }
        return out
    }

    /// Maps a token's byte-level characters back to raw bytes; nil if a character is not in the table.
    static func decode(_ token: [UInt8]) -> [UInt8]? {
        token.withUnsafeBufferPointer { b in
            var out: [UInt8] = []
            out.reserveCapacity(b.count)
            var i = 0
            while i < b.count {
                let (v, l) = UnicodeText.scalar(b, i)
                guard v < 0x144, scalarToByte[Int(v)] >= 0 else { return nil }
                out.append(UInt8(scalarToByte[Int(v)]))
                i += l
            }
            return out
        }
    }
}
