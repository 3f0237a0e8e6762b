// jinja2's filters and tests (the ones chat templates use), and transformers' `tojson`.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

extension JinjaBuiltins {
    static let filterNames: Set<String> = [
        "abs", "attr", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "first", "float",
        "indent", "int", "items", "join", "last", "length", "list", "lower", "map", "max", "min", "reject",
        "rejectattr", "replace", "reverse", "round", "safe", "select", "selectattr", "sort", "string", "sum",
        "title", "tojson", "trim", "unique", "upper", "wordcount",
    ]

    static let testNames: Set<String> = [
        "boolean", "callable", "defined", "divisibleby", "eq", "equalto", "escaped", "even", "false", "filter",
        "float", "ge", "gt", "greaterthan", "in", "integer", "iterable", "le", "lessthan", "lower", "lt",
        "mapping", "ne", "none", "number", "odd", "sameas", "sequence", "string", "test", "true", "undefined",
        "upper",
    ]

    // MARK: Lookups shared by the interpreter and the filters

    /// The sandbox's `getattr`: methods and attributes first, then `obj[name]`; missing is Undefined.
    static func getattr(_ o: JinjaValue, _ name: String) throws -> JinjaValue {
        switch o {
        case .dict(let d):
            if dictMethods.contains(name) { return boundMethod(o, name) }
            if let v = d[name] { return v }
            return .undefined("'dict object' has no attribute '\(name)'")
        case .namespace(let n):
            return n.attributes[name] ?? .undefined("'Namespace object' has no attribute '\(name)'")
        case .loop(let l):
            return loopAttribute(l, name)
        case .string:
            if stringMethods.contains(name) { return boundMethod(o, name) }
            return .undefined("'str object' has no attribute '\(name)'")
        case .list, .tuple:
            if listMethods.contains(name) { return boundMethod(o, name) }
            return .undefined("'\(o.typeName) object' has no attribute '\(name)'")
        case .undefined(let m):
            throw JinjaFailure(m)
        case .none:
            return .undefined("'None' has no attribute '\(name)'")
        default:
            return .undefined("'\(o.typeName) object' has no attribute '\(name)'")
        }
    }

    /// The sandbox's `getitem`: `obj[key]`, falling back to attributes for string keys; missing is Undefined.
    static func getitem(_ o: JinjaValue, _ key: JinjaValue) throws -> JinjaValue {
        switch (o, key) {
        case (.undefined(let m), _):
            throw JinjaFailure(m)
        case (.dict(let d), .string(let k)):
            if let v = d[k] { return v }
            if dictMethods.contains(k) { return boundMethod(o, k) }
            return .undefined("'dict object' has no attribute '\(k)'")
        case (.list(let a), _), (.tuple(let a), _):
            if case .string(let k) = key { return try getattr(o, k) }
            guard case .int(var i)? = key.numeric, !key.isFloat else {
                return .undefined("'\(o.typeName) object' has no element \(key.pyRepr)")
            }
            if i < 0 { i += a.count }
            guard i >= 0, i < a.count else { return .undefined("'\(o.typeName) object' has no element \(key.pyRepr)") }
            return a[i]
        case (.string(let s), _):
            if case .string(let k) = key { return try getattr(o, k) }
            guard case .int(var i)? = key.numeric, !key.isFloat else {
                return .undefined("'str object' has no element \(key.pyRepr)")
            }
            let scalars = Array(s.unicodeScalars)
            if i < 0 { i += scalars.count }
            guard i >= 0, i < scalars.count else { return .undefined("'str object' has no element \(key.pyRepr)") }
            return .string(String(scalars[i]))
        case (.namespace, .string(let k)), (.loop, .string(let k)):
            return try getattr(o, k)
        default:
            return .undefined("'\(o.typeName) object' has no element \(key.pyRepr)")
        }
    }

    /// jinja2's `make_attrgetter`: "a.b.0" looks up `item['a']['b'][0]`.
    static func attribute(_ item: JinjaValue, _ path: JinjaValue) throws -> JinjaValue {
        guard case .string(let p) = path else { return try getitem(item, path) }
        var v = item
        for part in p.split(separator: ".", omittingEmptySubsequences: false) {
            let key: JinjaValue = Int(part).map { .int($0) } ?? .string(String(part))
            v = try getitem(v, key)
        }
        return v
    }

    /// The item itself, or its attribute when `attr` is given.
    private static func pick(_ item: JinjaValue, _ attr: JinjaValue?) throws -> JinjaValue {
        guard let attr, !attr.isNone else { return item }
        return try attribute(item, attr)
    }

    private static func iterate(_ v: JinjaValue, _ filter: String) throws -> [JinjaValue] {
        guard let items = v.pyIterate else { throw JinjaFailure("'\(v.typeName)' object is not iterable (in filter '\(filter)')") }
        return items
    }

    /// Sort key for the case-insensitive default of `sort`, `unique`, `dictsort`, `min`, `max`.
    private static func foldCase(_ v: JinjaValue, _ caseSensitive: Bool) -> JinjaValue {
        if !caseSensitive, case .string(let s) = v { return .string(s.lowercased()) }
        return v
    }

    private static func sorted(_ items: [JinjaValue], key: (JinjaValue) throws -> JinjaValue, reverse: Bool) throws -> [JinjaValue] {
        let keyed = try items.map { (try key($0), $0) }
        var failure: JinjaFailure? = nil
        // Stable, like Python's sort; `reverse` keeps equal items in order, as Python's does.
        let indexed = Array(keyed.enumerated())
        let result = indexed.sorted { a, b in
            let (x, y) = reverse ? (b.element.0, a.element.0) : (a.element.0, b.element.0)
            if let less = x.pyLess(y) {
                if less { return true }
                if y.pyLess(x) == true { return false }
                return a.offset < b.offset
            }
            failure = JinjaFailure("'<' not supported between instances of '\(x.typeName)' and '\(y.typeName)'")
            return a.offset < b.offset
        }
        if let failure { throw failure }
        return result.map { $0.element.1 }
    }

    // MARK: Filters

    static func filter(_ name: String, _ v: JinjaValue, _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) throws -> JinjaValue {
        switch name {
        case "abs":
            switch v {
            case .int(let i):
                guard i != .min else { throw JinjaFailure("integer overflow") }
                return .int(abs(i))
            case .float(let d): return .float(abs(d))
            case .bool(let b): return .int(b ? 1 : 0)
            case .undefined(let m): throw JinjaFailure(m)
            default: throw JinjaFailure("bad operand type for abs(): '\(v.typeName)'")
            }
        case "attr":
            let b = try bind(name, ["name"], args, kwargs)
            guard case .string(let n)? = b[0] else { throw JinjaFailure("attr() needs an attribute name") }
            return try getattr(v, n)
        case "capitalize": return .string(pyCapitalize(v.pyStr))
        case "title":
            // jinja2's own title: words start after '-', whitespace, '(', '{', '[' or '<'.
            var out = ""
            var atWordStart = true
            for c in v.pyStr.unicodeScalars {
                if c == "-" || PythonFormat.isSpace(c) || "({[<".unicodeScalars.contains(c) {
                    out.unicodeScalars.append(c)
                    atWordStart = true
                } else {
                    out += atWordStart ? String(c).uppercased() : String(c).lowercased()
                    atWordStart = false
                }
            }
            return .string(out)
        case "upper": return .string(v.pyStr.uppercased())
        case "lower": return .string(v.pyStr.lowercased())
        case "count", "length":
            guard let n = v.pyLength else { throw JinjaFailure("object of type '\(v.typeName)' has no len()") }
            return .int(n)
        case "d", "default":
            let b = try bind(name, ["default_value", "boolean"], args, kwargs)
            if v.isUndefined || ((b[1]?.truthy ?? false) && !v.truthy) { return b[0] ?? .string("") }
            return v
        case "dictsort":
            let b = try bind(name, ["case_sensitive", "by", "reverse"], args, kwargs)
            guard case .dict(let d) = v else { throw JinjaFailure("dictsort filter only works on mappings") }
            let cs = b[0]?.truthy ?? false
            let byValue: Bool
            switch b[1] {
            case nil, .string("key")?: byValue = false
            case .string("value")?: byValue = true
            default: throw JinjaFailure("You can only sort by either \"key\" or \"value\"")
            }
            let pairs = d.items.map { JinjaValue.tuple([.string($0.0), $0.1]) }
            return .list(try sorted(pairs, key: { p in
                guard case .tuple(let kv) = p else { return p }
                return foldCase(kv[byValue ? 1 : 0], cs)
            }, reverse: b[2]?.truthy ?? false))
        case "e", "escape":
            var out = ""
            for c in v.pyStr.unicodeScalars {
                switch c {
                case "&": out += "&amp;"
                case "<": out += "&lt;"
                case ">": out += "&gt;"
                case "\"": out += "&#34;"
                case "'": out += "&#39;"
                default: out.unicodeScalars.append(c)
                }
            }
            return .string(out)
        case "first":
            if case .undefined = v { return .undefined("No first item, sequence was empty.") }
            return try iterate(v, name).first ?? .undefined("No first item, sequence was empty.")
        case "last":
            if case .undefined = v { return .undefined("No last item, sequence was empty.") }
            return try iterate(v, name).last ?? .undefined("No last item, sequence was empty.")
        case "float":
            let b = try bind(name, ["default"], args, kwargs)
            if case .undefined(let m) = v { throw JinjaFailure(m) }
            return pyFloat(v).map { .float($0) } ?? b[0] ?? .float(0)
        case "int":
            let b = try bind(name, ["default", "base"], args, kwargs)
            let base = try int(b[1], "base") ?? 10
            guard base == 0 || (2...36).contains(base) else { throw JinjaFailure("int() base must be >= 2 and <= 36, or 0") }
            if case .undefined(let m) = v { throw JinjaFailure(m) }
            if case .string(let s) = v, let i = pyParseInt(s, base: base) { return .int(i) }
            switch v {
            case .int: return v
            case .bool(let x): return .int(x ? 1 : 0)
            default:
                guard let d = pyFloat(v), d.isFinite else {
                    if let d = pyFloat(v), d.isInfinite { throw JinjaFailure("cannot convert float infinity to integer") }
                    return b[0] ?? .int(0)
                }
                guard let i = Int(exactly: d.rounded(.towardZero)) else { throw JinjaFailure("integer too large") }
                return .int(i)
            }
        case "indent":
            let b = try bind(name, ["width", "first", "blank"], args, kwargs)
            let indention: String
            switch b[0] {
            case nil: indention = "    "
            case .string(let s)?: indention = s
            case let w?:
                let width = max(0, try int(w, "width") ?? 4)
                try checkRepeat(1, width, "indent")
                indention = String(repeating: " ", count: width)
            }
            // jinja2 appends "\n" to the value first, which only works for strings.
            guard case .string(let text) = v else {
                if case .undefined(let m) = v { throw JinjaFailure(m) }
                throw JinjaFailure("unsupported operand type(s) for +=: '\(v.typeName)' and 'str'")
            }
            var lines = pySplitLines(text + "\n", keepEnds: false)
            var rv: String
            if b[2]?.truthy ?? false {
                rv = lines.joined(separator: "\n" + indention)
            } else {
                rv = lines.isEmpty ? "" : lines.removeFirst()
                if !lines.isEmpty {
                    rv += "\n" + lines.map { $0.isEmpty ? $0 : indention + $0 }.joined(separator: "\n")
                }
            }
            if b[1]?.truthy ?? false { rv = indention + rv }
            return .string(rv)
        case "items":
            switch v {
            case .undefined: return .list([])
            case .dict(let d): return .list(d.items.map { .tuple([.string($0.0), $0.1]) })
            default: throw JinjaFailure("Can only get item pairs from a mapping.")
            }
        case "join":
            let b = try bind(name, ["d", "attribute"], args, kwargs)
            var items = try iterate(v, name)
            if let a = b[1], !(a.isNone) { items = try items.map { try attribute($0, a) } }
            return .string(items.map(\.pyStr).joined(separator: b[0]?.pyStr ?? ""))
        case "list":
            return .list(try iterate(v, name))
        case "map":
            // jinja2's map/select/reject yield nothing for a falsy value (`if value: for item in value: ...`).
            guard v.truthy else { return .list([]) }
            let items = try iterate(v, name)
            if args.isEmpty, let a = kwargs.first(where: { $0.0 == "attribute" })?.1 {
                let def = kwargs.first(where: { $0.0 == "default" })?.1
                return .list(try items.map { item in
                    let x = try attribute(item, a)
                    if let def, x.isUndefined { return def }
                    return x
                })
            }
            guard case .string(let f)? = args.first else { throw JinjaFailure("map requires a filter name or attribute=") }
            guard filterNames.contains(f) else { throw JinjaFailure("no filter named '\(f)'") }
            let rest = Array(args.dropFirst())
            return .list(try items.map { try filter(f, $0, rest, kwargs) })
        case "select", "reject", "selectattr", "rejectattr":
            guard v.truthy else { return .list([]) }
            let items = try iterate(v, name)
            var rest = args
            var attr: JinjaValue? = nil
            if name.hasSuffix("attr") {
                guard !rest.isEmpty else { throw JinjaFailure("\(name) needs an attribute name") }
                attr = rest.removeFirst()
            }
            var testName: String? = nil
            if !rest.isEmpty {
                guard case .string(let t) = rest.removeFirst() else { throw JinjaFailure("\(name): the test name must be a string") }
                guard testNames.contains(t) else { throw JinjaFailure("no test named '\(t)'") }
                testName = t
            }
            let keep = name.hasPrefix("select")
            return .list(try items.filter { item in
                let x = try attr.map { try attribute(item, $0) } ?? item
                let passed = try testName.map { try test($0, x, rest, kwargs) } ?? x.truthy
                return passed == keep
            })
        case "max", "min":
            let b = try bind(name, ["case_sensitive", "attribute"], args, kwargs)
            let items = try iterate(v, name)
            guard !items.isEmpty else { return .undefined("No aggregated item, sequence was empty.") }
            let cs = b[0]?.truthy ?? false
            let s = try sorted(items, key: { foldCase(try pick($0, b[1]), cs) }, reverse: false)
            if name == "min" { return s.first! }
            // Python's max returns the first of equal maxima.
            let top = foldCase(try pick(s.last!, b[1]), cs)
            return try s.first { foldCase(try pick($0, b[1]), cs).pyEquals(top) } ?? s.last!
        case "replace":
            let b = try bind(name, ["old", "new", "count"], args, kwargs)
            guard let old = b[0], let new = b[1] else { throw JinjaFailure("replace needs old and new strings") }
            return .string(pyReplace(v.pyStr, old.pyStr, new.pyStr, try int(b[2], "count") ?? -1))
        case "reverse":
            switch v {
            case .string(let s): return .string(String(String.UnicodeScalarView(s.unicodeScalars.reversed())))
            default: return .list(try iterate(v, name).reversed())
            }
        case "round":
            let b = try bind(name, ["precision", "method"], args, kwargs)
            let precision = try int(b[0], "precision") ?? 0
            let method = try string(b[1], "method") ?? "common"
            guard ["common", "ceil", "floor"].contains(method) else { throw JinjaFailure("method must be common, ceil or floor") }
            guard let n = v.numeric else { throw JinjaFailure("type \(v.typeName) doesn't define __round__ method") }
            if method == "common" {
                if case .int(let i) = n, precision >= 0 { return .int(i) }
                return .float(pyRound(n.double, precision))
            }
            let scale = pow(10.0, Double(precision))
            let scaled = n.double * scale
            return .float((method == "ceil" ? scaled.rounded(.up) : scaled.rounded(.down)) / scale)
        case "safe", "string":
            return .string(v.pyStr)
        case "sort":
            let b = try bind(name, ["reverse", "case_sensitive", "attribute"], args, kwargs)
            let cs = b[1]?.truthy ?? false
            return .list(try sorted(try iterate(v, name), key: { foldCase(try pick($0, b[2]), cs) },
                                    reverse: b[0]?.truthy ?? false))
        case "sum":
            let b = try bind(name, ["attribute", "start"], args, kwargs)
            var total = b[1] ?? .int(0)
            for item in try iterate(v, name) {
                total = try binary(.add, total, try b[0].map { try attribute(item, $0) } ?? item)
            }
            return total
        case "tojson":
            let b = try bind(name, ["ensure_ascii", "indent", "separators", "sort_keys"], args, kwargs)
            var indent: String? = nil
            switch b[1] {
            case nil, .none?: indent = nil
            case .string(let s)?: indent = s
            case let w?:
                let width = max(0, try int(w, "indent") ?? 0)
                try checkRepeat(1, width, "indent")
                indent = String(repeating: " ", count: width)
            }
            var itemSep = indent == nil ? ", " : ","
            var keySep = ": "
            switch b[2] {
            case nil, .none?: break
            case .tuple(let seps)?, .list(let seps)?:
                guard seps.count == 2, case .string(let i) = seps[0], case .string(let k) = seps[1] else {
                    throw JinjaFailure("separators must be a pair of strings")
                }
                itemSep = i; keySep = k
            default: throw JinjaFailure("separators must be a pair of strings")
            }
            var out = ""
            try writeJSON(v, &out, ensureASCII: b[0]?.truthy ?? false, indent: indent, itemSep: itemSep, keySep: keySep,
                          sortKeys: b[3]?.truthy ?? false, level: 0)
            return .string(out)
        case "trim":
            let b = try bind(name, ["chars"], args, kwargs)
            return .string(pyStrip(v.pyStr, try string(b[0], "chars"), left: true, right: true))
        case "unique":
            let b = try bind(name, ["case_sensitive", "attribute"], args, kwargs)
            let cs = b[0]?.truthy ?? false
            var seen: [JinjaValue] = []
            var out: [JinjaValue] = []
            for item in try iterate(v, name) {
                let key = foldCase(try b[1].map { try attribute(item, $0) } ?? item, cs)
                if !seen.contains(where: { $0.pyEquals(key) }) { seen.append(key); out.append(item) }
            }
            return .list(out)
        case "wordcount":
            var count = 0
            var inWord = false
            for c in v.pyStr.unicodeScalars {
                let w = c == "_" || c.properties.generalCategory.isLetter || c.properties.numericType != nil
                if w && !inWord { count += 1 }
                inWord = w
            }
            return .int(count)
        default:
            throw JinjaFailure("no filter named '\(name)'")
        }
    }

    /// Python's `float(x)` for numbers and numeric strings; nil where Python raises.
    static func pyFloat(_ v: JinjaValue) -> Double? {
        switch v {
        case .int(let i): return Double(i)
        case .float(let d): return d
        case .bool(let b): return b ? 1 : 0
        case .string(let s):
            let t = pyStrip(s, nil, left: true, right: true).lowercased()
            switch t {
            case "inf", "+inf", "infinity", "+infinity": return .infinity
            case "-inf", "-infinity": return -.infinity
            case "nan", "+nan", "-nan": return .nan
            default: break
            }
            guard !t.isEmpty, t.unicodeScalars.allSatisfy({ "0123456789+-.e_".unicodeScalars.contains($0) }) else { return nil }
            guard !t.hasPrefix("_"), !t.hasSuffix("_"), !t.contains("__") else { return nil }
            return Double(t.filter { $0 != "_" })
        default: return nil
        }
    }

    /// Python's `int(s, base)` for strings: optional sign, surrounding whitespace, single underscores.
    static func pyParseInt(_ s: String, base: Int) -> Int? {
        var t = Substring(pyStrip(s, nil, left: true, right: true))
        var negative = false
        if t.hasPrefix("-") { negative = true; t = t.dropFirst() } else if t.hasPrefix("+") { t = t.dropFirst() }
        // A radix prefix is allowed when it matches the base ("0x1A" in base 16); base 0 takes it from the prefix.
        let prefixes = [16: "0x", 8: "0o", 2: "0b"]
        var base = base
        if base == 0 { base = prefixes.first { t.lowercased().hasPrefix($0.value) }?.key ?? 10 }
        if let p = prefixes[base], t.lowercased().hasPrefix(p) {
            t = t.dropFirst(2)
            if t.hasPrefix("_") { t = t.dropFirst() }
        }
        guard !t.isEmpty, !t.hasPrefix("_"), !t.hasSuffix("_"), !t.contains("__") else { return nil }
        guard let v = Int(t.filter { $0 != "_" }, radix: base) else { return nil }
        return negative ? -v : v
    }

    /// Python's `round(x, n)` for floats: correctly rounded (half to even on the exact binary value),
    /// which glibc's `%.*f` also is.
    static func pyRound(_ x: Double, _ digits: Int) -> Double {
        guard x.isFinite else { return x }
        if digits <= 0 {
            let scale = pow(10.0, Double(-digits))
            return (x / scale).rounded(.toNearestOrEven) * scale
        }
        guard digits < 300 else { return x }
        var buffer = [CChar](repeating: 0, count: 400)
        let n = withVaList([Int32(digits), x]) { vsnprintf(&buffer, buffer.count, "%.*f", $0) }
        guard n > 0, n < buffer.count else { return x }
        return Double(String(decoding: buffer[0..<Int(n)].map { UInt8(bitPattern: $0) }, as: UTF8.self)) ?? x
    }

    // MARK: JSON (Python's json.dumps)

    static func writeJSON(_ v: JinjaValue, _ out: inout String, ensureASCII: Bool, indent: String?, itemSep: String, keySep: String,
                          sortKeys: Bool, level: Int) throws {
        func newline(_ l: Int) {
            guard let indent else { return }
            out += "\n"
            for _ in 0..<l { out += indent }
        }
        switch v {
        case .none: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .int(let i): out += String(i)
        case .float(let d):
            if d.isNaN { out += "NaN" } else if d.isInfinite { out += d > 0 ? "Infinity" : "-Infinity" } else { out += PythonFormat.floatRepr(d) }
        case .string(let s): writeJSONString(s, &out, ensureASCII: ensureASCII)
        case .list(let items), .tuple(let items):
            if items.isEmpty { out += "[]"; return }
            out += "["
            for (i, item) in items.enumerated() {
                if i > 0 { out += itemSep }
                newline(level + 1)
                try writeJSON(item, &out, ensureASCII: ensureASCII, indent: indent, itemSep: itemSep, keySep: keySep, sortKeys: sortKeys, level: level + 1)
            }
            newline(level)
            out += "]"
        case .dict(let d):
            if d.count == 0 { out += "{}"; return }
            out += "{"
            let keys = sortKeys ? d.keys.sorted { $0.unicodeScalars.lexicographicallyPrecedes($1.unicodeScalars) } : d.keys
            for (i, k) in keys.enumerated() {
                if i > 0 { out += itemSep }
                newline(level + 1)
                writeJSONString(k, &out, ensureASCII: ensureASCII)
                out += keySep
                try writeJSON(d[k]!, &out, ensureASCII: ensureASCII, indent: indent, itemSep: itemSep, keySep: keySep, sortKeys: sortKeys, level: level + 1)
            }
            newline(level)
            out += "}"
        default:
            throw JinjaFailure("Object of type \(v.typeName) is not JSON serializable")
        }
    }

    /// A JSON string literal as Python's json.dumps writes it (the same writer JSONValue uses).
    static func writeJSONString(_ s: String, _ out: inout String, ensureASCII: Bool) {
        JSONValue.writeString(s, to: &out, ensureASCII: ensureASCII)
    }

    // MARK: Tests

    static func test(_ name: String, _ v: JinjaValue, _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) throws -> Bool {
        func arg() throws -> JinjaValue {
            guard let a = args.first ?? kwargs.first?.1 else { throw JinjaFailure("test '\(name)' needs an argument") }
            return a
        }
        switch name {
        case "defined": return !v.isUndefined
        case "undefined": return v.isUndefined
        case "none": return v.isNone
        case "boolean": if case .bool = v { return true }; return false
        case "true": if case .bool(true) = v { return true }; return false
        case "false": if case .bool(false) = v { return true }; return false
        case "integer": if case .int = v { return true }; return false
        case "float": return v.isFloat
        case "number": return v.numeric != nil
        case "string": return v.isString
        case "mapping": if case .dict = v { return true }; return false
        case "iterable":
            switch v {
            case .undefined, .string, .list, .tuple, .dict: return true
            default: return false
            }
        case "sequence":
            switch v {
            case .undefined, .string, .list, .tuple, .dict: return true
            default: return false
            }
        case "callable":
            if case .callable = v { return true }; return false
        case "sameas":
            let other = try arg()
            switch (v, other) {
            case (.none, .none): return true
            case (.bool(let a), .bool(let b)): return a == b
            case (.namespace(let a), .namespace(let b)): return a === b
            case (.int(let a), .int(let b)): return a == b
            default: return false
            }
        case "eq", "equalto": return v.pyEquals(try arg())
        case "ne": return !v.pyEquals(try arg())
        case "lt", "lessthan": return try compare(.lt, v, try arg())
        case "le": return try compare(.le, v, try arg())
        case "gt", "greaterthan": return try compare(.gt, v, try arg())
        case "ge": return try compare(.ge, v, try arg())
        case "in": return try contains(try arg(), v)
        case "odd", "even", "divisibleby":
            // jinja2: `value % 2 == 1`, `value % 2 == 0`, `value % num == 0`, with Python's `%`.
            guard v.numeric != nil else {
                if case .undefined(let m) = v { throw JinjaFailure(m) }
                throw JinjaFailure("test '\(name)' needs a number, got '\(v.typeName)'")
            }
            let divisor = name == "divisibleby" ? try arg() : .int(2)
            let remainder = try binary(.mod, v, divisor)
            return remainder.pyEquals(.int(name == "odd" ? 1 : 0))
        case "lower", "upper": return pyCharClass(v.pyStr, name == "lower" ? "islower" : "isupper")
        case "escaped": return false
        case "filter": return filterNames.contains(v.pyStr)
        case "test": return testNames.contains(v.pyStr)
        default: throw JinjaFailure("no test named '\(name)'")
        }
    }
}

extension JinjaValue {
    var isNone: Bool { if case .none = self { return true }; return false }
}
