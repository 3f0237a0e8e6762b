// Runtime values of the chat-template interpreter, with Python's semantics.
//
// Chat templates are Jinja2 templates run by Python, so what they print depends on Python's rules:
// `str(True)` is "True", `str(['a'])` is "['a']", `1 == 1.0`, `True == 1`, strings index by code point,
// and `0.1 + 0.2` prints as "0.30000000000000004". This file models those values and rules: truthiness,
// equality, ordering, `str()` and `repr()`. Input data (messages, tools) arrives as `JSONValue`.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A value while a template runs.
enum JinjaValue {
    /// Jinja2's default `Undefined`: prints as "", is falsy, iterates as empty; most other uses are errors.
    /// The payload says what was missing, for error messages ("'foo' is undefined").
    case undefined(String)
    case none
    case bool(Bool)
    case int(Int)
    case float(Double)
    case string(String)
    case list([JinjaValue])
    case tuple([JinjaValue])
    case dict(JinjaDict)
    case namespace(JinjaNamespace)
    case loop(JinjaLoop)
    case callable(JinjaCallable)
}

/// An insertion-ordered dictionary with string keys (Python dicts keep insertion order).
struct JinjaDict {
    private(set) var keys: [String] = []
    private var storage: [String: JinjaValue] = [:]

    init() {}
    init(_ pairs: [(String, JinjaValue)]) {
        for (k, v) in pairs { self[k] = v }
    }

    subscript(key: String) -> JinjaValue? {
        get { storage[key] }
        set {
            if let newValue {
                if storage.updateValue(newValue, forKey: key) == nil { keys.append(key) }
            } else if storage.removeValue(forKey: key) != nil {
                keys.removeAll { $0 == key }
            }
        }
    }

    var count: Int { keys.count }
    var values: [JinjaValue] { keys.map { storage[$0]! } }
    var items: [(String, JinjaValue)] { keys.map { ($0, storage[$0]!) } }
}

/// `namespace(...)`: the one mutable object templates may change (`{% set ns.x = ... %}`).
final class JinjaNamespace {
    var attributes: JinjaDict
    init(_ attributes: JinjaDict) { self.attributes = attributes }
}

/// The `loop` variable inside a `for` body.
final class JinjaLoop {
    let items: [JinjaValue]
    var index0 = 0
    let depth0: Int
    /// For `loop.changed(...)`.
    var lastChanged: [JinjaValue]?
    init(items: [JinjaValue], depth0: Int) {
        self.items = items
        self.depth0 = depth0
    }
}

/// A function value: a macro, a global such as `range`, or a bound method such as `'a'.upper`.
final class JinjaCallable {
    let name: String
    let call: (_ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) throws -> JinjaValue
    init(name: String, call: @escaping ([JinjaValue], [(String, JinjaValue)]) throws -> JinjaValue) {
        self.name = name
        self.call = call
    }
}

// MARK: - Conversion from JSON

extension JinjaValue {
    init(_ json: JSONValue) {
        switch json {
        case .null: self = .none
        case .bool(let b): self = .bool(b)
        case .int(let i): self = Int(exactly: i).map { .int($0) } ?? .float(Double(i))
        case .double(let d): self = .float(d)
        case .string(let s): self = .string(s)
        case .array(let a): self = .list(a.map(JinjaValue.init))
        case .object(let o):
            var d = JinjaDict()
            for (k, v) in o { d[k] = JinjaValue(v) }
            self = .dict(d)
        }
    }
}

// MARK: - Python semantics

extension JinjaValue {
    var isUndefined: Bool { if case .undefined = self { return true }; return false }

    /// Python truthiness (`Undefined` is falsy).
    var truthy: Bool {
        switch self {
        case .undefined, .none: return false
        case .bool(let b): return b
        case .int(let i): return i != 0
        case .float(let d): return d != 0
        case .string(let s): return !s.isEmpty
        case .list(let a), .tuple(let a): return !a.isEmpty
        case .dict(let d): return d.count > 0
        case .namespace, .loop, .callable: return true
        }
    }

    /// Python's type name, for error messages ("'int' object ...").
    var typeName: String {
        switch self {
        case .undefined: return "Undefined"
        case .none: return "NoneType"
        case .bool: return "bool"
        case .int: return "int"
        case .float: return "float"
        case .string: return "str"
        case .list: return "list"
        case .tuple: return "tuple"
        case .dict: return "dict"
        case .namespace: return "Namespace"
        case .loop: return "LoopContext"
        case .callable: return "function"
        }
    }

    /// The value as a number, if it is one (bool counts, as in Python).
    var numeric: Numeric? {
        switch self {
        case .bool(let b): return .int(b ? 1 : 0)
        case .int(let i): return .int(i)
        case .float(let d): return .float(d)
        default: return nil
        }
    }

    enum Numeric {
        case int(Int)
        case float(Double)
        var double: Double {
            switch self {
            case .int(let i): return Double(i)
            case .float(let d): return d
            }
        }
    }

    /// Python `==`.
    func pyEquals(_ other: JinjaValue) -> Bool {
        switch (self, other) {
        case (.undefined, .undefined), (.none, .none): return true
        case (.string(let a), .string(let b)): return a.unicodeScalars.elementsEqual(b.unicodeScalars)
        case (.list(let a), .list(let b)), (.tuple(let a), .tuple(let b)):
            return a.count == b.count && zip(a, b).allSatisfy { $0.pyEquals($1) }
        case (.dict(let a), .dict(let b)):
            guard a.count == b.count else { return false }
            for (k, v) in a.items {
                guard let w = b[k], v.pyEquals(w) else { return false }
            }
            return true
        case (.namespace(let a), .namespace(let b)): return a === b
        case (.loop(let a), .loop(let b)): return a === b
        case (.callable(let a), .callable(let b)): return a === b
        default:
            if let x = numeric, let y = other.numeric {
                switch (x, y) {
                case (.int(let i), .int(let j)): return i == j
                default: return x.double == y.double
                }
            }
            return false
        }
    }

    /// Python `<`; nil when the types cannot be ordered (a TypeError in Python).
    func pyLess(_ other: JinjaValue) -> Bool? {
        switch (self, other) {
        case (.string(let a), .string(let b)):
            return a.unicodeScalars.lexicographicallyPrecedes(b.unicodeScalars)
        case (.list(let a), .list(let b)), (.tuple(let a), .tuple(let b)):
            for (x, y) in zip(a, b) where !x.pyEquals(y) { return x.pyLess(y) }
            return a.count < b.count
        default:
            if let x = numeric, let y = other.numeric {
                switch (x, y) {
                case (.int(let i), .int(let j)): return i < j
                default: return x.double < y.double
                }
            }
            return nil
        }
    }

    /// Python `str(value)`, which is what `{{ value }}` prints (`Undefined` prints as "").
    var pyStr: String {
        switch self {
        case .undefined: return ""
        case .string(let s): return s
        default: return pyRepr
        }
    }

    /// Python `repr(value)`.
    var pyRepr: String {
        switch self {
        case .undefined: return "Undefined"
        case .none: return "None"
        case .bool(let b): return b ? "True" : "False"
        case .int(let i): return String(i)
        case .float(let d): return PythonFormat.floatRepr(d)
        case .string(let s): return PythonFormat.stringRepr(s)
        case .list(let a): return "[" + a.map(\.pyRepr).joined(separator: ", ") + "]"
        case .tuple(let a):
            if a.count == 1 { return "(" + a[0].pyRepr + ",)" }
            return "(" + a.map(\.pyRepr).joined(separator: ", ") + ")"
        case .dict(let d): return PythonFormat.dictRepr(d)
        case .namespace(let n): return "<Namespace " + PythonFormat.dictRepr(n.attributes) + ">"
        case .loop(let l): return "<LoopContext \(l.index0 + 1)/\(l.items.count)>"
        case .callable(let c): return "<function \(c.name)>"
        }
    }

    /// Python `len(value)`; nil for values without a length. `Undefined` has length 0.
    var pyLength: Int? {
        switch self {
        case .undefined: return 0
        case .string(let s): return s.unicodeScalars.count
        case .list(let a), .tuple(let a): return a.count
        case .dict(let d): return d.count
        case .namespace(let n): return n.attributes.count
        default: return nil
        }
    }

    /// Python `list(value)`: the items of a sequence, the keys of a dict, the characters of a string.
    /// nil for values that are not iterable. `Undefined` iterates as empty.
    var pyIterate: [JinjaValue]? {
        switch self {
        case .undefined: return []
        case .list(let a), .tuple(let a): return a
        case .dict(let d): return d.keys.map { .string($0) }
        case .string(let s): return s.unicodeScalars.map { .string(String($0)) }
        default: return nil
        }
    }
}

// MARK: - Python text formatting

enum PythonFormat {
    /// Python's `repr(float)`: the shortest digits that round-trip, in fixed notation when the decimal
    /// exponent is in -4..<16, else in exponent notation with a signed, at-least-two-digit exponent.
    static func floatRepr(_ d: Double) -> String {
        if d.isNaN { return "nan" }
        if d.isInfinite { return d > 0 ? "inf" : "-inf" }
        let (negative, digits, pointPosition) = shortestDigits(d)
        var out = negative ? "-" : ""
        if pointPosition > -4 && pointPosition <= 16 {
            if pointPosition <= 0 {
                out += "0." + String(repeating: "0", count: -pointPosition) + digits
            } else if pointPosition >= digits.count {
                out += digits + String(repeating: "0", count: pointPosition - digits.count) + ".0"
            } else {
                let i = digits.index(digits.startIndex, offsetBy: pointPosition)
                out += digits[..<i] + "." + digits[i...]
            }
        } else {
            out += String(digits.first!)
            if digits.count > 1 { out += "." + digits.dropFirst() }
            let e = pointPosition - 1
            out += e < 0 ? "e-" : "e+"
            let mag = String(abs(e))
            out += (mag.count < 2 ? "0" : "") + mag
        }
        return out
    }

    /// The shortest round-trip decimal digits of a finite double (from Swift's own shortest printing),
    /// as (sign, digits without leading/trailing zeros, decimal point position): value = 0.DIGITS × 10^position.
    static func shortestDigits(_ d: Double) -> (Bool, String, Int) {
        var text = d.description
        var negative = false
        if text.hasPrefix("-") { negative = true; text.removeFirst() }
        var exponent = 0
        if let e = text.firstIndex(where: { $0 == "e" || $0 == "E" }) {
            exponent = Int(text[text.index(after: e)...]) ?? 0
            text = String(text[..<e])
        }
        var intPart = text
        var fracPart = ""
        if let dot = text.firstIndex(of: ".") {
            intPart = String(text[..<dot])
            fracPart = String(text[text.index(after: dot)...])
        }
        var digits = intPart + fracPart
        var position = intPart.count + exponent
        while digits.hasPrefix("0") && digits.count > 1 { digits.removeFirst(); position -= 1 }
        while digits.hasSuffix("0") && digits.count > 1 { digits.removeLast() }
        if digits == "0" { position = 1 }
        return (negative, digits, position)
    }

    /// Python's `repr(str)`: single quotes unless the text has a single quote and no double quote;
    /// backslash escapes for the quote, backslash, \n \r \t and non-printable characters.
    static func stringRepr(_ s: String) -> String {
        let quote: Unicode.Scalar = (s.contains("'") && !s.contains("\"")) ? "\"" : "'"
        var out = String(Character(quote))
        for c in s.unicodeScalars {
            switch c {
            case quote, "\\": out += "\\" + String(Character(c))
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if isPrintable(c) {
                    out.unicodeScalars.append(c)
                } else if c.value < 0x100 {
                    out += "\\x" + hex(c.value, width: 2)
                } else if c.value < 0x10000 {
                    out += "\\u" + hex(c.value, width: 4)
                } else {
                    out += "\\U" + hex(c.value, width: 8)
                }
            }
        }
        out.unicodeScalars.append(quote)
        return out
    }

    static func dictRepr(_ d: JinjaDict) -> String {
        "{" + d.items.map { stringRepr($0.0) + ": " + $0.1.pyRepr }.joined(separator: ", ") + "}"
    }

    static func hex(_ v: UInt32, width: Int) -> String {
        let h = String(v, radix: 16)
        return String(repeating: "0", count: max(0, width - h.count)) + h
    }

    /// Python's `str.isprintable()` for one character: everything but the "Other" and "Separator"
    /// categories, except that the plain space is printable.
    static func isPrintable(_ c: Unicode.Scalar) -> Bool {
        if c == " " { return true }
        switch c.properties.generalCategory {
        case .control, .format, .surrogate, .privateUse, .unassigned,
             .lineSeparator, .paragraphSeparator, .spaceSeparator:
            return false
        default:
            return true
        }
    }

    /// Python's `str.isspace()` for one character (what `strip()` and `split()` remove).
    static func isSpace(_ c: Unicode.Scalar) -> Bool {
        switch c.value {
        case 0x09...0x0D, 0x1C...0x20, 0x85, 0xA0, 0x1680, 0x2000...0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000:
            return true
        default:
            return false
        }
    }
}
