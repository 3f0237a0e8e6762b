// A small JSON value type with a byte-level parser and a serializer.
//
// Why our own: FoundationEssentials has Codable JSON but no dynamic JSON, and the formats we read
// (safetensors headers, tokenizer.json, chat-template `tojson`) need dynamic values whose object
// keys keep their file order, as Python's `json` does.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A JSON document. Objects keep their keys in file order.
public enum JSONValue: Equatable, Sendable {
    case null
    case bool(Bool)
    /// Integers that fit in Int64 are kept exactly; everything else is a Double.
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object(JSONObject)
}

/// An insertion-ordered JSON object.
public struct JSONObject: Equatable, Sendable, Sequence {
    public private(set) var keys: [String] = []
    private var storage: [Key: JSONValue] = [:]

    /// Keys compare by their UTF-8 bytes, as Python's do. (Swift's String == treats canonically
    /// equivalent spellings such as "é" and "e\u{301}" as one key, which would merge distinct
    /// entries of a tokenizer vocab.)
    private struct Key: Hashable, Sendable {
        let string: String
        init(_ string: String) { self.string = string }
        static func == (a: Key, b: Key) -> Bool { a.string.utf8.elementsEqual(b.string.utf8) }
        func hash(into hasher: inout Hasher) {
            var s = string
            s.withUTF8 { hasher.combine(bytes: UnsafeRawBufferPointer($0)) }
        }
    }

    public init() {}
    public init(_ pairs: [(String, JSONValue)]) {
        for (k, v) in pairs { self[k] = v }
    }

    public subscript(key: String) -> JSONValue? {
        get { storage[Key(key)] }
        set {
            if let newValue {
                if storage.updateValue(newValue, forKey: Key(key)) == nil { keys.append(key) }
            } else if storage.removeValue(forKey: Key(key)) != nil {
                keys.removeAll { $0.utf8.elementsEqual(key.utf8) }
            }
        }
    }

    public var count: Int { keys.count }

    public func makeIterator() -> AnyIterator<(key: String, value: JSONValue)> {
        var i = 0
        return AnyIterator {
            guard i < keys.count else { return nil }
            defer { i += 1 }
            return (keys[i], storage[Key(keys[i])]!)
        }
    }
}

// MARK: - Accessors

extension JSONValue {
    public subscript(key: String) -> JSONValue? {
        if case .object(let o) = self { return o[key] }
        return nil
    }
    public var string: String? { if case .string(let s) = self { return s }; return nil }
    public var bool: Bool? { if case .bool(let b) = self { return b }; return nil }
    public var array: [JSONValue]? { if case .array(let a) = self { return a }; return nil }
    public var object: JSONObject? { if case .object(let o) = self { return o }; return nil }
    public var isNull: Bool { self == .null }
    /// The value as an integer, if it is an integer (or a double with no fractional part).
    public var int: Int? {
        switch self {
        case .int(let i): return Int(exactly: i)
        case .double(let d): return Int(exactly: d)
        default: return nil
        }
    }
    public var double: Double? {
        switch self {
        case .int(let i): return Double(i)
        case .double(let d): return d
        default: return nil
        }
    }
}

// MARK: - Parsing

public struct JSONParseError: Error, CustomStringConvertible {
    public let offset: Int
    public let message: String
    public var description: String { "invalid JSON at byte \(offset): \(message)" }
}

extension JSONValue {
    public static func parse(_ text: String) throws -> JSONValue {
        try parse(bytes: Array(text.utf8))
    }

    public static func parse<C: Collection>(bytes: C) throws -> JSONValue where C.Element == UInt8 {
        let array = Array(bytes)
        return try array.withUnsafeBufferPointer { buffer in
            var parser = JSONParser(bytes: buffer)
            let value = try parser.parseValue(depth: 0)
            parser.skipWhitespace()
            if parser.index != buffer.count { throw parser.error("unexpected trailing characters") }
            return value
        }
    }
}

private struct JSONParser {
    let bytes: UnsafeBufferPointer<UInt8>
    var index = 0

    init(bytes: UnsafeBufferPointer<UInt8>) { self.bytes = bytes }

    func error(_ message: String) -> JSONParseError { JSONParseError(offset: index, message: message) }

    mutating func skipWhitespace() {
        while index < bytes.count {
            switch bytes[index] {
            case 0x20, 0x09, 0x0A, 0x0D: index += 1
            default: return
            }
        }
    }

    mutating func expect(_ literal: StaticString, value: JSONValue) throws -> JSONValue {
        let n = literal.utf8CodeUnitCount
        guard index + n <= bytes.count else { throw error("unexpected end of input") }
        for i in 0..<n where bytes[index + i] != literal.utf8Start[i] {
            throw error("expected \(literal)")
        }
        index += n
        return value
    }

    mutating func parseValue(depth: Int) throws -> JSONValue {
        guard depth < 512 else { throw error("nesting deeper than 512") }
        skipWhitespace()
        guard index < bytes.count else { throw error("unexpected end of input") }
        switch bytes[index] {
        case UInt8(ascii: "{"): return try parseObject(depth: depth)
        case UInt8(ascii: "["): return try parseArray(depth: depth)
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"): return try expect("true", value: .bool(true))
        case UInt8(ascii: "f"): return try expect("false", value: .bool(false))
        case UInt8(ascii: "n"): return try expect("null", value: .null)
        case UInt8(ascii: "N"): return try expect("NaN", value: .double(.nan))
        case UInt8(ascii: "I"): return try expect("Infinity", value: .double(.infinity))
        default: return try parseNumber()
        }
    }

    mutating func parseObject(depth: Int) throws -> JSONValue {
        index += 1
        var object = JSONObject()
        skipWhitespace()
        if index < bytes.count, bytes[index] == UInt8(ascii: "}") { index += 1; return .object(object) }
        while true {
            skipWhitespace()
            guard index < bytes.count, bytes[index] == UInt8(ascii: "\"") else { throw error("expected a string key") }
            let key = try parseString()
            skipWhitespace()
            guard index < bytes.count, bytes[index] == UInt8(ascii: ":") else { throw error("expected ':'") }
            index += 1
            object[key] = try parseValue(depth: depth + 1)
            skipWhitespace()
            guard index < bytes.count else { throw error("unexpected end of input in object") }
            if bytes[index] == UInt8(ascii: ",") { index += 1; continue }
            if bytes[index] == UInt8(ascii: "}") { index += 1; return .object(object) }
            throw error("expected ',' or '}'")
        }
    }

    mutating func parseArray(depth: Int) throws -> JSONValue {
        index += 1
        var array: [JSONValue] = []
        skipWhitespace()
        if index < bytes.count, bytes[index] == UInt8(ascii: "]") { index += 1; return .array(array) }
        while true {
            array.append(try parseValue(depth: depth + 1))
            skipWhitespace()
            guard index < bytes.count else { throw error("unexpected end of input in array") }
            if bytes[index] == UInt8(ascii: ",") { index += 1; continue }
            if bytes[index] == UInt8(ascii: "]") { index += 1; return .array(array) }
            throw error("expected ',' or ']'")
        }
    }

    mutating func parseHex4() throws -> UInt32 {
        guard index + 4 <= bytes.count else { throw error("truncated \\u escape") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let c = bytes[index]
            let d: UInt32
            switch c {
            case 0x30...0x39: d = UInt32(c - 0x30)
            case 0x41...0x46: d = UInt32(c - 0x41 + 10)
            case 0x61...0x66: d = UInt32(c - 0x61 + 10)
            default: throw error("bad hex digit in \\u escape")
            }
            v = v << 4 | d
            index += 1
        }
        return v
    }

    mutating func parseString() throws -> String {
        index += 1  // opening quote
        var out: [UInt8] = []
        let start = index
        // Fast path: no escapes.
        while index < bytes.count, bytes[index] != UInt8(ascii: "\""), bytes[index] != UInt8(ascii: "\\") { index += 1 }
        out.append(contentsOf: bytes[start..<index])
        while true {
            guard index < bytes.count else { throw error("unterminated string") }
            let c = bytes[index]
            if c == UInt8(ascii: "\"") { index += 1; break }
            if c != UInt8(ascii: "\\") { out.append(c); index += 1; continue }
            index += 1
            guard index < bytes.count else { throw error("unterminated escape") }
            let e = bytes[index]
            index += 1
            switch e {
            case UInt8(ascii: "\""): out.append(0x22)
            case UInt8(ascii: "\\"): out.append(0x5C)
            case UInt8(ascii: "/"): out.append(0x2F)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "u"):
                var scalar = try parseHex4()
                if (0xD800..<0xDC00).contains(scalar) {
                    // A high surrogate must pair with a low one; a lone one becomes U+FFFD as Python does on encode.
                    if index + 6 <= bytes.count, bytes[index] == UInt8(ascii: "\\"), bytes[index + 1] == UInt8(ascii: "u") {
                        let save = index
                        index += 2
                        let low = try parseHex4()
                        if (0xDC00..<0xE000).contains(low) {
                            scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                        } else {
                            index = save
                            scalar = 0xFFFD
                        }
                    } else {
                        scalar = 0xFFFD
                    }
                } else if (0xDC00..<0xE000).contains(scalar) {
                    scalar = 0xFFFD
                }
                out.append(contentsOf: Array(String(Character(Unicode.Scalar(scalar)!)).utf8))
            default: throw error("bad escape character")
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    mutating func parseNumber() throws -> JSONValue {
        let start = index
        var isInteger = true
        if index < bytes.count, bytes[index] == UInt8(ascii: "-") {
            index += 1
            if index < bytes.count, bytes[index] == UInt8(ascii: "I") {
                _ = try expect("Infinity", value: .null)
                return .double(-.infinity)
            }
        }
        while index < bytes.count {
            let c = bytes[index]
            if c >= 0x30 && c <= 0x39 { index += 1; continue }
            if c == UInt8(ascii: ".") || c == UInt8(ascii: "e") || c == UInt8(ascii: "E") || c == UInt8(ascii: "+") || c == UInt8(ascii: "-") {
                isInteger = false
                index += 1
                continue
            }
            break
        }
        guard index > start else { throw error("unexpected character '\(Character(Unicode.Scalar(bytes[start])))'") }
        let text = String(decoding: bytes[start..<index], as: UTF8.self)
        if isInteger, let i = Int64(text) { return .int(i) }
        guard let d = Double(text) else { throw JSONParseError(offset: start, message: "bad number '\(text)'") }
        return .double(d)
    }
}

// MARK: - Serializing

extension JSONValue {
    /// Serialization options matching Python's `json.dumps` arguments.
    public struct WriteOptions: Sendable {
        /// `indent=None` when nil: everything on one line.
        public var indent: Int?
        public var itemSeparator: String
        public var keySeparator: String
        /// Python's `ensure_ascii`: escape every non-ASCII character as `\uXXXX`.
        public var ensureASCII: Bool
        public var sortKeys: Bool

        public init(indent: Int? = nil, itemSeparator: String? = nil, keySeparator: String = ": ", ensureASCII: Bool = false, sortKeys: Bool = false) {
            self.indent = indent
            self.itemSeparator = itemSeparator ?? (indent == nil ? ", " : ",")
            self.keySeparator = keySeparator
            self.ensureASCII = ensureASCII
            self.sortKeys = sortKeys
        }

        /// The compact form (`separators=(",", ":")`) used in file headers.
        public static let compact = WriteOptions(itemSeparator: ",", keySeparator: ":")
    }

    public func serialized(_ options: WriteOptions = .compact) -> String {
        var out = ""
        write(to: &out, options: options, level: 0)
        return out
    }

    private func write(to out: inout String, options: WriteOptions, level: Int) {
        switch self {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .int(let i): out += String(i)
        case .double(let d): out += JSONValue.pythonFloatRepr(d)
        case .string(let s): JSONValue.writeString(s, to: &out, ensureASCII: options.ensureASCII)
        case .array(let items):
            if items.isEmpty { out += "[]"; return }
            out += "["
            for (i, item) in items.enumerated() {
                if i > 0 { out += options.itemSeparator }
                newline(&out, options, level + 1)
                item.write(to: &out, options: options, level: level + 1)
            }
            newline(&out, options, level)
            out += "]"
        case .object(let object):
            if object.count == 0 { out += "{}"; return }
            out += "{"
            let keys = options.sortKeys ? object.keys.sorted() : object.keys
            for (i, key) in keys.enumerated() {
                if i > 0 { out += options.itemSeparator }
                newline(&out, options, level + 1)
                JSONValue.writeString(key, to: &out, ensureASCII: options.ensureASCII)
                out += options.keySeparator
                object[key]!.write(to: &out, options: options, level: level + 1)
            }
            newline(&out, options, level)
            out += "}"
        }
    }

    private func newline(_ out: inout String, _ options: WriteOptions, _ level: Int) {
        guard let indent = options.indent else { return }
        out += "\n" + String(repeating: " ", count: indent * level)
    }

    static func writeString(_ s: String, to out: inout String, ensureASCII: Bool) {
        out += "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            default:
                if scalar.value < 0x20 || (ensureASCII && scalar.value > 0x7E) {
                    if scalar.value > 0xFFFF {
                        let v = scalar.value - 0x10000
                        out += hex4(0xD800 + (v >> 10)) + hex4(0xDC00 + (v & 0x3FF))
                    } else {
                        out += hex4(scalar.value)
                    }
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        out += "\""
    }

    private static func hex4(_ v: UInt32) -> String {
        let h = String(v, radix: 16)
        return "\\u" + String(repeating: "0", count: 4 - h.count) + h
    }

    /// Python's `repr(float)`: shortest round-trip digits, always with a '.' or exponent.
    static func pythonFloatRepr(_ d: Double) -> String {
        if d.isNaN { return "NaN" }
        if d.isInfinite { return d > 0 ? "Infinity" : "-Infinity" }
        var s = "\(d)"  // Swift prints the shortest round-trip form, e.g. "1e-05", "100000.0"
        if s.contains("e") {
            // Python writes exponents with at least two digits and an explicit sign: 1e-05, 1e+16.
            let parts = s.split(separator: "e", maxSplits: 1)
            var mantissa = String(parts[0])
            if mantissa.hasSuffix(".0") { mantissa.removeLast(2) }
            var exponent = String(parts[1])
            var sign = "+"
            if exponent.hasPrefix("-") { sign = "-"; exponent.removeFirst() } else if exponent.hasPrefix("+") { exponent.removeFirst() }
            if exponent.count < 2 { exponent = "0" + exponent }
            s = mantissa + "e" + sign + exponent
        }
        return s
    }
}
