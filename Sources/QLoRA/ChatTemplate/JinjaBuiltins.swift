// jinja2's filters, tests and globals, Python's operators and the str/dict/list methods chat templates
// call, plus the globals transformers adds (`raise_exception`, `strftime_now`) and its `tojson`
// (`json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, not jinja2's
// HTML-escaping one).

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

enum JinjaBuiltins {
    // MARK: Argument binding

    /// Binds positional and keyword arguments to parameter names, as Python does.
    static func bind(_ fn: String, _ names: [String], _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) throws -> [JinjaValue?] {
        guard args.count <= names.count else {
            throw JinjaFailure("\(fn)() takes at most \(names.count) argument(s) (\(args.count) given)")
        }
        var out = [JinjaValue?](repeating: nil, count: names.count)
        for (i, a) in args.enumerated() { out[i] = a }
        for (k, v) in kwargs {
            guard let i = names.firstIndex(of: k) else { throw JinjaFailure("\(fn)() got an unexpected keyword argument '\(k)'") }
            guard out[i] == nil else { throw JinjaFailure("\(fn)() got multiple values for argument '\(k)'") }
            out[i] = v
        }
        return out
    }

    static func string(_ v: JinjaValue?, _ what: String) throws -> String? {
        guard let v else { return nil }
        switch v {
        case .string(let s): return s
        case .none: return nil
        default: throw JinjaFailure("\(what) must be a string, not '\(v.typeName)'")
        }
    }

    static func int(_ v: JinjaValue?, _ what: String) throws -> Int? {
        guard let v else { return nil }
        if case .none = v { return nil }
        guard case .int(let i)? = v.numeric, !v.isFloat else { throw JinjaFailure("\(what) must be an integer, not '\(v.typeName)'") }
        return i
    }

    // MARK: Globals

    static func globals(fixedNow: Int64?) -> [String: JinjaValue] {
        var g: [String: JinjaValue] = [:]
        g["range"] = .callable(JinjaCallable(name: "range") { args, kwargs in
            guard kwargs.isEmpty else { throw JinjaFailure("range() takes no keyword arguments") }
            let ints = try args.map { try int($0, "range() argument") ?? 0 }
            var start = 0, stop = 0, step = 1
            switch ints.count {
            case 1: stop = ints[0]
            case 2: start = ints[0]; stop = ints[1]
            case 3: start = ints[0]; stop = ints[1]; step = ints[2]
            default: throw JinjaFailure("range expected 1 to 3 arguments, got \(ints.count)")
            }
            guard step != 0 else { throw JinjaFailure("range() arg 3 must not be zero") }
            var out: [JinjaValue] = []
            var i = start
            while step > 0 ? i < stop : i > stop {
                out.append(.int(i))
                // The sandbox's limit (MAX_RANGE).
                if out.count > 100_000 { throw JinjaFailure("Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).") }
                let (next, overflow) = i.addingReportingOverflow(step)
                if overflow { break }  // past Int's end is past `stop` too
                i = next
            }
            return .list(out)
        })
        g["dict"] = .callable(JinjaCallable(name: "dict") { args, kwargs in
            var d = JinjaDict()
            if let first = args.first {
                guard args.count == 1, case .dict(let base) = first else { throw JinjaFailure("dict() takes a mapping and keyword arguments") }
                d = base
            }
            for (k, v) in kwargs { d[k] = v }
            return .dict(d)
        })
        g["namespace"] = .callable(JinjaCallable(name: "namespace") { args, kwargs in
            var d = JinjaDict()
            if let first = args.first {
                guard args.count == 1, case .dict(let base) = first else { throw JinjaFailure("namespace() takes a mapping and keyword arguments") }
                d = base
            }
            for (k, v) in kwargs { d[k] = v }
            return .namespace(JinjaNamespace(d))
        })
        g["raise_exception"] = .callable(JinjaCallable(name: "raise_exception") { args, _ in
            throw JinjaFailure(args.first?.pyStr ?? "", raised: true)
        })
        g["strftime_now"] = .callable(JinjaCallable(name: "strftime_now") { args, _ in
            guard case .string(let format)? = args.first else { throw JinjaFailure("strftime_now() needs a format string") }
            return .string(formatNow(format, fixedNow: fixedNow))
        })
        return g
    }

    /// C `strftime` of the current local time (as Python's `datetime.now().strftime`), or of `fixedNow` in UTC.
    static func formatNow(_ format: String, fixedNow: Int64?) -> String {
        var t = time_t(fixedNow ?? Int64(time(nil)))
        var parts = tm()
        if fixedNow != nil { gmtime_r(&t, &parts) } else { localtime_r(&t, &parts) }
        var buffer = [CChar](repeating: 0, count: 512)
        let n = strftime(&buffer, buffer.count, format, &parts)
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    // MARK: Operators

    /// The largest string (bytes) or list (16 bytes an item) one operation may build: far above any prompt, far below
    /// what would exhaust memory (`"x" * 10**12`).
    static let maxBuiltBytes = 64 << 20

    static func checkRepeat(_ unit: Int, _ count: Int, _ what: String) throws {
        let (total, overflow) = unit.multipliedReportingOverflow(by: max(count, 0))
        if overflow || total > maxBuiltBytes {
            throw JinjaFailure("the \(what) would be larger than \(maxBuiltBytes) bytes (the template's size budget)")
        }
    }

    static func binary(_ op: JinjaBinaryOp, _ l: JinjaValue, _ r: JinjaValue) throws -> JinjaValue {
        if case .undefined(let m) = l { throw JinjaFailure(m) }
        if case .undefined(let m) = r { throw JinjaFailure(m) }
        func unsupported() -> JinjaFailure {
            JinjaFailure("unsupported operand type(s) for \(op.rawValue): '\(l.typeName)' and '\(r.typeName)'")
        }
        if let a = l.numeric, let b = r.numeric {
            if case .int(let x) = a, case .int(let y) = b {
                switch op {
                case .add: return try checked(x.addingReportingOverflow(y))
                case .sub: return try checked(x.subtractingReportingOverflow(y))
                case .mul: return try checked(x.multipliedReportingOverflow(by: y))
                case .div:
                    guard y != 0 else { throw JinjaFailure("division by zero") }
                    return .float(Double(x) / Double(y))
                case .floordiv:
                    guard y != 0 else { throw JinjaFailure("integer division or modulo by zero") }
                    guard !(x == .min && y == -1) else { throw JinjaFailure("integer overflow") }
                    var q = x / y
                    if (x % y != 0) && ((x < 0) != (y < 0)) { q -= 1 }
                    return .int(q)
                case .mod:
                    guard y != 0 else { throw JinjaFailure("integer division or modulo by zero") }
                    if y == -1 { return .int(0) }  // Int.min % -1 would trap; the remainder is 0
                    var m = x % y
                    if m != 0 && ((m < 0) != (y < 0)) { m += y }
                    return .int(m)
                case .pow:
                    if y < 0 { return .float(pow(Double(x), Double(y))) }
                    var result = 1, base = x, e = y
                    while e > 0 {
                        if e & 1 == 1 { result = try checkedInt(result.multipliedReportingOverflow(by: base)) }
                        e >>= 1
                        if e > 0 { base = try checkedInt(base.multipliedReportingOverflow(by: base)) }
                    }
                    return .int(result)
                }
            }
            let x = a.double, y = b.double
            switch op {
            case .add: return .float(x + y)
            case .sub: return .float(x - y)
            case .mul: return .float(x * y)
            case .div:
                guard y != 0 else { throw JinjaFailure("float division by zero") }
                return .float(x / y)
            case .floordiv:
                guard y != 0 else { throw JinjaFailure("float floor division by zero") }
                return .float(pyFloatMod(x, y).div)
            case .mod:
                guard y != 0 else { throw JinjaFailure("float modulo") }
                return .float(pyFloatMod(x, y).mod)
            case .pow: return .float(pow(x, y))
            }
        }
        switch (op, l, r) {
        case (.add, .string(let a), .string(let b)):
            try checkRepeat(a.utf8.count + b.utf8.count, 1, "string")
            return .string(a + b)
        case (.add, .list(let a), .list(let b)): return .list(a + b)
        case (.add, .tuple(let a), .tuple(let b)): return .tuple(a + b)
        case (.mul, .string(let s), _), (.mul, _, .string(let s)):
            guard case .int(let n)? = (l.isString ? r : l).numeric, !(l.isString ? r : l).isFloat else { throw unsupported() }
            try checkRepeat(s.utf8.count, n, "string")
            return .string(n > 0 ? String(repeating: s, count: n) : "")
        case (.mul, .list(let a), _), (.mul, _, .list(let a)), (.mul, .tuple(let a), _), (.mul, _, .tuple(let a)):
            let isTuple: Bool
            if case .tuple = l { isTuple = true } else if case .tuple = r { isTuple = true } else { isTuple = false }
            let count = (l.isList || isTupleValue(l)) ? r : l
            guard case .int(let n)? = count.numeric, !count.isFloat else { throw unsupported() }
            try checkRepeat(a.count * 16, n, "list")
            let items = n > 0 ? Array([[JinjaValue]](repeating: a, count: n).joined()) : []
            return isTuple ? .tuple(items) : .list(items)
        case (.mod, .string(let format), _):
            return .string(try printfFormat(format, r))
        default:
            throw unsupported()
        }
    }

    /// Python's `format % args` for the plain conversions `%s`, `%r`, `%d`, `%i` and `%%`
    /// (flags, widths and `%(name)s` are reported as unsupported).
    static func printfFormat(_ format: String, _ args: JinjaValue) throws -> String {
        var items: [JinjaValue]
        var isTuple = false
        if case .tuple(let t) = args { items = t; isTuple = true } else { items = [args] }
        var out = ""
        var used = 0
        var it = format.unicodeScalars.makeIterator()
        while let c = it.next() {
            guard c == "%" else { out.unicodeScalars.append(c); continue }
            guard let spec = it.next() else { throw JinjaFailure("incomplete format") }
            if spec == "%" { out += "%"; continue }
            guard "srdi".unicodeScalars.contains(spec) else {
                throw JinjaFailure("printf-style formatting with '%\(Character(spec))' is not supported")
            }
            guard used < items.count else { throw JinjaFailure("not enough arguments for format string") }
            let item = items[used]
            used += 1
            switch spec {
            case "s": out += item.pyStr
            case "r": out += item.pyRepr
            default:
                switch item {
                case .int(let i): out += String(i)
                case .bool(let b): out += b ? "1" : "0"
                case .float(let d) where d.isFinite: out += String(Int(d.rounded(.towardZero)))
                default: throw JinjaFailure("%\(Character(spec)) format: a real number is required, not \(item.typeName)")
                }
            }
        }
        if used < items.count {
            // Python tolerates an unused non-tuple argument that supports indexing (a list or dict).
            var tolerated = false
            if !isTuple { switch args { case .list, .dict: tolerated = true; default: break } }
            if !tolerated { throw JinjaFailure("not all arguments converted during string formatting") }
        }
        return out
    }

    private static func isTupleValue(_ v: JinjaValue) -> Bool { if case .tuple = v { return true }; return false }

    private static func checked(_ r: (partialValue: Int, overflow: Bool)) throws -> JinjaValue {
        .int(try checkedInt(r))
    }
    private static func checkedInt(_ r: (partialValue: Int, overflow: Bool)) throws -> Int {
        guard !r.overflow else { throw JinjaFailure("integer overflow (values beyond 64 bits are not supported)") }
        return r.partialValue
    }

    /// Python's float `divmod`: the remainder takes the divisor's sign.
    static func pyFloatMod(_ x: Double, _ y: Double) -> (div: Double, mod: Double) {
        var mod = fmod(x, y)
        var div = (x - mod) / y
        if mod != 0 {
            if (y < 0) != (mod < 0) { mod += y; div -= 1 }
        } else {
            mod = y < 0 ? -0.0 : 0.0
        }
        var floordiv: Double
        if div != 0 {
            floordiv = div.rounded(.down)
            if div - floordiv > 0.5 { floordiv += 1 }
        } else {
            floordiv = x / y < 0 ? -0.0 : 0.0
        }
        return (floordiv, mod)
    }

    static func compare(_ op: JinjaCompareOp, _ l: JinjaValue, _ r: JinjaValue) throws -> Bool {
        switch op {
        case .eq: return l.pyEquals(r)
        case .ne: return !l.pyEquals(r)
        case .in: return try contains(r, l)
        case .notIn: return !(try contains(r, l))
        case .lt, .le, .gt, .ge:
            if case .undefined(let m) = l { throw JinjaFailure(m) }
            if case .undefined(let m) = r { throw JinjaFailure(m) }
            let (a, b) = (op == .lt || op == .le) ? (l, r) : (r, l)
            guard let less = a.pyLess(b) else {
                throw JinjaFailure("'\(op.rawValue)' not supported between instances of '\(l.typeName)' and '\(r.typeName)'")
            }
            if less { return true }
            return (op == .le || op == .ge) && l.pyEquals(r)
        }
    }

    /// Python `item in container`.
    static func contains(_ container: JinjaValue, _ item: JinjaValue) throws -> Bool {
        switch container {
        case .undefined: return false
        case .string(let s):
            guard case .string(let sub) = item else {
                throw JinjaFailure("'in <string>' requires string as left operand, not \(item.typeName)")
            }
            if sub.isEmpty { return true }
            return Array(s.unicodeScalars).firstRange(of: Array(sub.unicodeScalars)) != nil
        case .list(let a), .tuple(let a): return a.contains { $0.pyEquals(item) }
        case .dict(let d):
            switch item {
            case .string(let k): return d[k] != nil
            case .list, .dict, .namespace, .loop: throw JinjaFailure("unhashable type: '\(item.typeName)'")
            default: return false
            }
        case .namespace(let n):
            if case .string(let k) = item { return n.attributes[k] != nil }
            return false
        default:
            throw JinjaFailure("argument of type '\(container.typeName)' is not iterable")
        }
    }

    /// Python slicing of a list, tuple or string.
    static func slice(_ o: JinjaValue, _ start: JinjaValue?, _ stop: JinjaValue?, _ step: JinjaValue?) throws -> JinjaValue {
        // Slices bypass the sandbox's getitem in jinja2 (plain Python subscripting), so bad ones are errors.
        switch o {
        case .list, .tuple, .string: break
        case .undefined(let m): throw JinjaFailure(m)
        case .dict: throw JinjaFailure("unhashable type: 'slice'")
        default: throw JinjaFailure("'\(o.typeName)' object is not subscriptable")
        }
        let st = try int(step, "slice step") ?? 1
        guard st != 0 else { throw JinjaFailure("slice step cannot be zero") }
        func indices(_ n: Int) throws -> [Int] {
            let lower = st > 0 ? 0 : -1, upper = st > 0 ? n : n - 1
            func clamp(_ v: JinjaValue?, _ def: Int) throws -> Int {
                guard var i = try int(v, "slice index") else { return def }
                if i < 0 { i += n; if i < lower { i = lower } } else if i > upper { i = upper }
                return i
            }
            let a = try clamp(start, st > 0 ? lower : upper)
            let b = try clamp(stop, st > 0 ? upper : lower)
            var out: [Int] = []
            var i = a
            while st > 0 ? i < b : i > b { out.append(i); i += st }
            return out
        }
        switch o {
        case .list(let a): return .list(try indices(a.count).map { a[$0] })
        case .tuple(let a): return .tuple(try indices(a.count).map { a[$0] })
        case .string(let s):
            let scalars = Array(s.unicodeScalars)
            var out = ""
            for i in try indices(scalars.count) { out.unicodeScalars.append(scalars[i]) }
            return .string(out)
        case .undefined(let m): throw JinjaFailure(m)
        default: throw JinjaFailure("'\(o.typeName)' object is not subscriptable")
        }
    }

    // MARK: Loop

    static func loopAttribute(_ l: JinjaLoop, _ name: String) -> JinjaValue {
        let n = l.items.count, i = l.index0
        switch name {
        case "index": return .int(i + 1)
        case "index0": return .int(i)
        case "revindex": return .int(n - i)
        case "revindex0": return .int(n - i - 1)
        case "first": return .bool(i == 0)
        case "last": return .bool(i == n - 1)
        case "length": return .int(n)
        case "depth": return .int(l.depth0 + 1)
        case "depth0": return .int(l.depth0)
        case "previtem": return i > 0 ? l.items[i - 1] : .undefined("there is no previous item")
        case "nextitem": return i + 1 < n ? l.items[i + 1] : .undefined("there is no next item")
        case "cycle":
            return .callable(JinjaCallable(name: "cycle") { args, _ in
                guard !args.isEmpty else { throw JinjaFailure("no items for cycling given") }
                return args[l.index0 % args.count]
            })
        case "changed":
            return .callable(JinjaCallable(name: "changed") { args, _ in
                if let last = l.lastChanged, last.count == args.count, zip(last, args).allSatisfy({ $0.pyEquals($1) }) { return .bool(false) }
                l.lastChanged = args
                return .bool(true)
            })
        default: return .undefined("'LoopContext object' has no attribute '\(name)'")
        }
    }

    // MARK: Methods

    static let stringMethods: Set<String> = [
        "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "startswith", "endswith", "upper", "lower",
        "title", "capitalize", "replace", "find", "rfind", "count", "join", "isdigit", "isalpha", "isalnum",
        "isspace", "isupper", "islower", "removeprefix", "removesuffix", "index", "rindex", "format",
    ]
    static let dictMethods: Set<String> = ["items", "keys", "values", "get", "copy"]
    static let listMethods: Set<String> = ["count", "index", "copy"]

    static func boundMethod(_ receiver: JinjaValue, _ name: String) -> JinjaValue {
        .callable(JinjaCallable(name: name) { args, kwargs in
            guard let v = try callMethod(receiver, name, args, kwargs) else {
                throw JinjaFailure("'\(receiver.typeName)' object has no attribute '\(name)'")
            }
            return v
        })
    }

    /// Calls a Python method on a value; nil if the value has no such method.
    static func callMethod(_ o: JinjaValue, _ name: String, _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) throws -> JinjaValue? {
        switch o {
        case .string(let s):
            guard stringMethods.contains(name) else { return nil }
            return try stringMethod(s, name, args, kwargs)
        case .dict(let d):
            switch name {
            case "items": _ = try bind(name, [], args, kwargs); return .list(d.items.map { .tuple([.string($0.0), $0.1]) })
            case "keys": _ = try bind(name, [], args, kwargs); return .list(d.keys.map { .string($0) })
            case "values": _ = try bind(name, [], args, kwargs); return .list(d.values)
            case "copy": _ = try bind(name, [], args, kwargs); return o
            case "get":
                guard !args.isEmpty, args.count <= 2, kwargs.isEmpty else { throw JinjaFailure("get expected 1 or 2 arguments") }
                if case .string(let k) = args[0], let v = d[k] { return v }
                return args.count > 1 ? args[1] : .none
            default: return nil
            }
        case .list(let a), .tuple(let a):
            switch name {
            case "count":
                let b = try bind(name, ["value"], args, kwargs)
                guard let x = b[0] else { throw JinjaFailure("count() takes exactly one argument") }
                return .int(a.filter { $0.pyEquals(x) }.count)
            case "index":
                let b = try bind(name, ["value"], args, kwargs)
                guard let x = b[0] else { throw JinjaFailure("index() takes at least one argument") }
                guard let i = a.firstIndex(where: { $0.pyEquals(x) }) else { throw JinjaFailure("\(x.pyRepr) is not in list") }
                return .int(i)
            case "copy": return o
            default: return nil
            }
        default:
            return nil
        }
    }

    private static func stringMethod(_ s: String, _ name: String, _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) throws -> JinjaValue {
        switch name {
        case "strip", "lstrip", "rstrip":
            let b = try bind(name, ["chars"], args, kwargs)
            let chars = try string(b[0], "\(name) arg")
            return .string(pyStrip(s, chars, left: name != "rstrip", right: name != "lstrip"))
        case "split", "rsplit":
            let b = try bind(name, ["sep", "maxsplit"], args, kwargs)
            let sep = try string(b[0], "sep")
            let maxsplit = try int(b[1], "maxsplit") ?? -1
            if sep == "" { throw JinjaFailure("empty separator") }
            return .list(pySplit(s, sep, maxsplit, fromRight: name == "rsplit").map { .string($0) })
        case "splitlines":
            let b = try bind(name, ["keepends"], args, kwargs)
            return .list(pySplitLines(s, keepEnds: b[0]?.truthy ?? false).map { .string($0) })
        case "startswith", "endswith":
            let b = try bind(name, ["prefix", "start", "end"], args, kwargs)
            guard b[1] == nil, b[2] == nil else { throw JinjaFailure("\(name) with start/end is not supported") }
            var candidates: [String] = []
            switch b[0] {
            case .string(let p)?: candidates = [p]
            case .tuple(let items)?, .list(let items)?:
                for item in items {
                    guard case .string(let p) = item else { throw JinjaFailure("\(name) first arg must be str or a tuple of str") }
                    candidates.append(p)
                }
            default: throw JinjaFailure("\(name) first arg must be str or a tuple of str")
            }
            let scalars = Array(s.unicodeScalars)
            return .bool(candidates.contains { p in
                let ps = Array(p.unicodeScalars)
                return name == "startswith" ? scalars.starts(with: ps) : scalars.reversed().starts(with: ps.reversed())
            })
        case "upper": _ = try bind(name, [], args, kwargs); return .string(s.uppercased())
        case "lower": _ = try bind(name, [], args, kwargs); return .string(s.lowercased())
        case "title": _ = try bind(name, [], args, kwargs); return .string(pyTitle(s))
        case "capitalize": _ = try bind(name, [], args, kwargs); return .string(pyCapitalize(s))
        case "replace":
            let b = try bind(name, ["old", "new", "count"], args, kwargs)
            guard let old = try string(b[0], "replace() argument 1"), let new = try string(b[1], "replace() argument 2") else {
                throw JinjaFailure("replace() takes at least 2 arguments")
            }
            return .string(pyReplace(s, old, new, try int(b[2], "count") ?? -1))
        case "find", "rfind", "index", "rindex", "count":
            let b = try bind(name, ["sub"], args, kwargs)
            guard let sub = try string(b[0], "\(name) argument") else { throw JinjaFailure("\(name)() takes at least 1 argument") }
            let hay = Array(s.unicodeScalars), needle = Array(sub.unicodeScalars)
            var positions: [Int] = []
            if needle.isEmpty {
                positions = Array(0...hay.count)
            } else if needle.count <= hay.count {
                var i = 0
                while i + needle.count <= hay.count {
                    if hay[i..<(i + needle.count)].elementsEqual(needle) {
                        positions.append(i)
                        if name == "count" { i += needle.count; continue }
                    }
                    i += 1
                }
            }
            switch name {
            case "count": return .int(positions.count)
            case "find": return .int(positions.first ?? -1)
            case "rfind": return .int(positions.last ?? -1)
            default:
                guard let p = name == "index" ? positions.first : positions.last else { throw JinjaFailure("substring not found") }
                return .int(p)
            }
        case "join":
            let b = try bind(name, ["iterable"], args, kwargs)
            guard let items = b[0]?.pyIterate else { throw JinjaFailure("can only join an iterable") }
            var parts: [String] = []
            for item in items {
                guard case .string(let p) = item else { throw JinjaFailure("sequence item: expected str instance, \(item.typeName) found") }
                parts.append(p)
            }
            return .string(parts.joined(separator: s))
        case "isdigit", "isalpha", "isalnum", "isspace", "isupper", "islower":
            _ = try bind(name, [], args, kwargs)
            return .bool(pyCharClass(s, name))
        case "removeprefix", "removesuffix":
            let b = try bind(name, ["affix"], args, kwargs)
            guard let affix = try string(b[0], "\(name) argument") else { throw JinjaFailure("\(name)() takes exactly one argument") }
            let scalars = Array(s.unicodeScalars), a = Array(affix.unicodeScalars)
            var out = ""
            if name == "removeprefix", !a.isEmpty, scalars.starts(with: a) {
                out.unicodeScalars.append(contentsOf: scalars[a.count...])
            } else if name == "removesuffix", !a.isEmpty, scalars.count >= a.count, scalars[(scalars.count - a.count)...].elementsEqual(a) {
                out.unicodeScalars.append(contentsOf: scalars[..<(scalars.count - a.count)])
            } else {
                out = s
            }
            return .string(out)
        default:
            throw JinjaFailure("the string method '\(name)' is not supported")
        }
    }

    // MARK: Python string helpers

    static func pyStrip(_ s: String, _ chars: String?, left: Bool, right: Bool) -> String {
        let scalars = Array(s.unicodeScalars)
        let set = chars.map { Set($0.unicodeScalars) }
        func strip(_ c: Unicode.Scalar) -> Bool { set?.contains(c) ?? PythonFormat.isSpace(c) }
        var a = 0, b = scalars.count
        if left { while a < b, strip(scalars[a]) { a += 1 } }
        if right { while b > a, strip(scalars[b - 1]) { b -= 1 } }
        if a == 0 && b == scalars.count { return s }
        var out = ""
        out.unicodeScalars.append(contentsOf: scalars[a..<b])
        return out
    }

    static func pySplit(_ s: String, _ sep: String?, _ maxsplit: Int, fromRight: Bool) -> [String] {
        let scalars = Array(s.unicodeScalars)
        func str(_ r: Range<Int>) -> String {
            var out = ""
            out.unicodeScalars.append(contentsOf: scalars[r])
            return out
        }
        var parts: [String] = []
        if let sep {
            let needle = Array(sep.unicodeScalars)
            if !fromRight {
                var start = 0, i = 0
                while i + needle.count <= scalars.count, maxsplit < 0 || parts.count < maxsplit {
                    if scalars[i..<(i + needle.count)].elementsEqual(needle) {
                        parts.append(str(start..<i))
                        i += needle.count
                        start = i
                    } else {
                        i += 1
                    }
                }
                parts.append(str(start..<scalars.count))
            } else {
                var end = scalars.count, i = scalars.count - needle.count
                while i >= 0, maxsplit < 0 || parts.count < maxsplit {
                    if scalars[i..<(i + needle.count)].elementsEqual(needle) {
                        parts.append(str((i + needle.count)..<end))
                        end = i
                        i -= needle.count
                    } else {
                        i -= 1
                    }
                }
                parts.append(str(0..<end))
                parts.reverse()
            }
            return parts
        }
        // Whitespace splitting: runs of whitespace separate, no empty strings.
        if !fromRight {
            var i = 0
            while i < scalars.count {
                while i < scalars.count, PythonFormat.isSpace(scalars[i]) { i += 1 }
                if i == scalars.count { break }
                if maxsplit >= 0, parts.count == maxsplit {
                    var end = scalars.count
                    while end > i, PythonFormat.isSpace(scalars[end - 1]) { end -= 1 }
                    parts.append(str(i..<end))
                    break
                }
                let start = i
                while i < scalars.count, !PythonFormat.isSpace(scalars[i]) { i += 1 }
                parts.append(str(start..<i))
            }
        } else {
            var i = scalars.count
            while i > 0 {
                while i > 0, PythonFormat.isSpace(scalars[i - 1]) { i -= 1 }
                if i == 0 { break }
                if maxsplit >= 0, parts.count == maxsplit {
                    var start = 0
                    while start < i, PythonFormat.isSpace(scalars[start]) { start += 1 }
                    parts.append(str(start..<i))
                    break
                }
                let end = i
                while i > 0, !PythonFormat.isSpace(scalars[i - 1]) { i -= 1 }
                parts.append(str(i..<end))
            }
            parts.reverse()
        }
        return parts
    }

    /// Python's `str.splitlines`: splits at \n, \r, \r\n, \v, \f, \x1c-\x1e, \x85, \u2028, \u2029.
    static func pySplitLines(_ s: String, keepEnds: Bool) -> [String] {
        let scalars = Array(s.unicodeScalars)
        var lines: [String] = []
        var start = 0, i = 0
        while i < scalars.count {
            let c = scalars[i].value
            var breakLength = 0
            switch c {
            case 0x0D: breakLength = (i + 1 < scalars.count && scalars[i + 1] == "\n") ? 2 : 1
            case 0x0A, 0x0B, 0x0C, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029: breakLength = 1
            default: break
            }
            if breakLength > 0 {
                var line = ""
                line.unicodeScalars.append(contentsOf: scalars[start..<(keepEnds ? i + breakLength : i)])
                lines.append(line)
                i += breakLength
                start = i
            } else {
                i += 1
            }
        }
        if start < scalars.count {
            var line = ""
            line.unicodeScalars.append(contentsOf: scalars[start...])
            lines.append(line)
        }
        return lines
    }

    static func pyReplace(_ s: String, _ old: String, _ new: String, _ count: Int) -> String {
        let scalars = Array(s.unicodeScalars), needle = Array(old.unicodeScalars)
        var out = ""
        var done = 0
        if needle.isEmpty {
            // Python inserts `new` between every character and at both ends.
            for c in scalars {
                if count < 0 || done < count { out += new; done += 1 }
                out.unicodeScalars.append(c)
            }
            if count < 0 || done < count { out += new }
            return out
        }
        var i = 0
        while i < scalars.count {
            if (count < 0 || done < count), i + needle.count <= scalars.count, scalars[i..<(i + needle.count)].elementsEqual(needle) {
                out += new
                i += needle.count
                done += 1
            } else {
                out.unicodeScalars.append(scalars[i])
                i += 1
            }
        }
        return out
    }

    static func isCased(_ c: Unicode.Scalar) -> Bool {
        c.properties.isLowercase || c.properties.isUppercase || c.properties.generalCategory == .titlecaseLetter
    }

    /// Python's `str.title()`: a cased character after an uncased one starts a word.
    static func pyTitle(_ s: String) -> String {
        var out = ""
        var previousCased = false
        for c in s.unicodeScalars {
            out += previousCased ? c.properties.lowercaseMapping : c.properties.titlecaseMapping
            previousCased = isCased(c)
        }
        return out
    }

    /// Python's `str.capitalize()`: first character title-cased, the rest lower-cased.
    static func pyCapitalize(_ s: String) -> String {
        var out = ""
        for (i, c) in s.unicodeScalars.enumerated() {
            out += i == 0 ? c.properties.titlecaseMapping : c.properties.lowercaseMapping
        }
        return out
    }

    static func pyCharClass(_ s: String, _ name: String) -> Bool {
        let scalars = Array(s.unicodeScalars)
        switch name {
        case "isupper", "islower":
            var sawCased = false
            for c in scalars where isCased(c) {
                sawCased = true
                if name == "isupper" ? c.properties.isLowercase || c.properties.generalCategory == .titlecaseLetter
                                     : c.properties.isUppercase || c.properties.generalCategory == .titlecaseLetter { return false }
            }
            return sawCased
        default:
            guard !scalars.isEmpty else { return false }
            return scalars.allSatisfy { c in
                switch name {
                case "isdigit": return c.properties.numericType == .decimal || c.properties.numericType == .digit
                case "isalpha": return c.properties.isAlphabetic && c.properties.generalCategory.isLetter
                case "isalnum": return c.properties.generalCategory.isLetter || c.properties.numericType != nil
                default: return PythonFormat.isSpace(c)
                }
            }
        }
    }
}

extension Unicode.GeneralCategory {
    var isLetter: Bool {
        switch self {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return true
        default: return false
        }
    }
}

extension JinjaValue {
    var isString: Bool { if case .string = self { return true }; return false }
    var isList: Bool { if case .list = self { return true }; return false }
}
