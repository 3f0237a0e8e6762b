import XCTest
@testable import QLoRA

// The fuzz suite's machinery: seeded mutations of valid fixtures, and a tally that accepts only the
// library's clear error types (or a correct result) from each case.
//
// Environment:
//   QLORA_FUZZ_CASES=N     cases per reader instead of the default (e.g. 100000 for a long run)
//   QLORA_FUZZ_SEED=S      a different seed (the default seeds make every run the same)
//   QLORA_FUZZ_VERBOSE=1   print each case before running it, to find the input of a crash (a trap ends the process)

/// Random choices from the library's `SeededGenerator`, so that every run tries the same cases.
struct Fuzzer {
    var rng: SeededGenerator

    init(seed: UInt64) {
        let extra = ProcessInfo.processInfo.environment["QLORA_FUZZ_SEED"].flatMap { UInt64($0) } ?? 0
        rng = SeededGenerator(seed: seed ^ extra)
    }

    /// Cases per reader: `defaultCount`, or QLORA_FUZZ_CASES.
    static func cases(_ defaultCount: Int) -> Int {
        if let s = ProcessInfo.processInfo.environment["QLORA_FUZZ_CASES"], let n = Int(s), n > 0 { return n }
        return defaultCount
    }

    static let verbose = ProcessInfo.processInfo.environment["QLORA_FUZZ_VERBOSE"] != nil

    mutating func int(_ range: Range<Int>) -> Int { Int.random(in: range, using: &rng) }
    mutating func chance(_ p: Double) -> Bool { Double.random(in: 0..<1, using: &rng) < p }
    mutating func pick<T>(_ items: [T]) -> T { items[int(0..<items.count)] }

    // MARK: Bytes

    /// Values that make length, count and offset fields lie: zero, off by one, sign bit, all ones, huge.
    static let interesting64: [UInt64] = [
        0, 1, 2, 7, 8, 31, 32, 255, 0xFFFF, 0xFFFF_FFFF, 0x1_0000_0000, 1 << 40, 1 << 48, 1 << 62,
        UInt64(Int64.max), 1 << 63, UInt64.max - 7, UInt64.max,
    ]
    static let interesting32: [UInt32] = [0, 1, 2, 3, 7, 8, 9, 12, 13, 31, 32, 255, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF]

    /// A position: three times in four inside `focus` (where the structure lives), else anywhere.
    mutating func position(in count: Int, focus: Range<Int>?) -> Int {
        if let focus, !focus.isEmpty, focus.upperBound <= count, chance(0.75) { return int(focus) }
        return int(0..<max(count, 1))
    }

    /// One byte-level mutation of `bytes`, described for the tally.
    mutating func mutateBytes(_ bytes: [UInt8], focus: Range<Int>? = nil) -> (String, [UInt8]) {
        var out = bytes
        guard !bytes.isEmpty else { return ("empty", bytes) }
        switch int(0..<7) {
        case 0:
            let at = position(in: bytes.count, focus: focus)
            return ("truncate at \(at)", Array(bytes[..<at]))
        case 1:
            let at = position(in: bytes.count, focus: focus), bit = int(0..<8)
            out[at] ^= 1 << UInt8(bit)
            return ("flip bit \(bit) of byte \(at)", out)
        case 2:
            let at = position(in: bytes.count, focus: focus), value = UInt8(truncatingIfNeeded: int(0..<256))
            out[at] = value
            return ("byte \(at) = \(value)", out)
        case 3:
            let at = min(position(in: bytes.count, focus: focus), max(0, bytes.count - 8)), value = pick(Self.interesting64)
            for i in 0..<min(8, bytes.count - at) { out[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
            return ("u64 at \(at) = \(value)", out)
        case 4:
            let at = min(position(in: bytes.count, focus: focus), max(0, bytes.count - 4)), value = pick(Self.interesting32)
            for i in 0..<min(4, bytes.count - at) { out[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) }
            return ("u32 at \(at) = \(value)", out)
        case 5:
            let at = position(in: bytes.count, focus: focus), n = min(int(1..<64), bytes.count - at)
            out.removeSubrange(at..<(at + n))
            return ("delete \(n) bytes at \(at)", out)
        default:
            let at = position(in: bytes.count, focus: focus), n = min(int(1..<64), bytes.count - at)
            out.insert(contentsOf: bytes[at..<(at + n)], at: at)
            return ("repeat \(n) bytes at \(at)", out)
        }
    }

    // MARK: JSON

    enum PathStep: CustomStringConvertible {
        case key(String), index(Int)
        var description: String {
            switch self {
            case .key(let k): return ".\(k)"
            case .index(let i): return "[\(i)]"
            }
        }
    }

    /// Every value's path in a document (the root's is empty).
    static func paths(_ value: JSONValue, _ prefix: [PathStep] = [], into out: inout [[PathStep]]) {
        out.append(prefix)
        switch value {
        case .object(let o): for (k, v) in o { paths(v, prefix + [.key(k)], into: &out) }
        case .array(let a): for (i, v) in a.enumerated() { paths(v, prefix + [.index(i)], into: &out) }
        default: break
        }
    }

    /// `value` with the element at `path` replaced by `edit(old)`; nil from `edit` deletes it.
    static func editing(_ value: JSONValue, at path: ArraySlice<PathStep>, _ edit: (JSONValue) -> JSONValue?) -> JSONValue? {
        guard let step = path.first else { return edit(value) }
        switch (value, step) {
        case (.object(var o), .key(let k)):
            guard let child = o[k] else { return value }
            o[k] = editing(child, at: path.dropFirst(), edit)
            return .object(o)
        case (.array(var a), .index(let i)) where a.indices.contains(i):
            if let new = editing(a[i], at: path.dropFirst(), edit) { a[i] = new } else { a.remove(at: i) }
            return .array(a)
        default:
            return value
        }
    }

    /// A replacement that keeps the document valid JSON but not what the reader expects.
    mutating func jsonReplacement(for old: JSONValue) -> (String, JSONValue?) {
        switch int(0..<14) {
        case 0: return ("delete", nil)
        case 1: return ("null", .null)
        case 2: return ("number as string", .string(old.double.map { "\($0)" } ?? "12"))
        case 3:
            if case .int(let i) = old { return ("negated", .int(i == Int64.min ? Int64.max : -i)) }
            if case .double(let d) = old { return ("negated", .double(-d)) }
            return ("-1", .int(-1))
        case 4: return ("zero", .int(0))
        case 5:
            let huge: [JSONValue] = [.int(Int64.max), .int(Int64.min), .int(1 << 40), .int(1 << 31), .double(1e300), .double(-1e300)]
            let v = pick(huge)
            return ("huge \(v.serialized())", v)
        case 6: return ("fraction", .double(0.5))
        case 7: return ("nested array", .array([.array([old])]))
        case 8: return ("empty string", .string(""))
        case 9: return ("empty array", .array([]))
        case 10: return ("empty object", .object(JSONObject()))
        case 11: return ("bool", .bool(chance(0.5)))
        case 12: return ("long string", .string(String(repeating: "ab\u{e9}\u{1F600}<|", count: int(1..<200))))
        default:
            switch old {
            case .int(let i): return ("off by one", .int(i == Int64.max ? i : i + 1))
            case .string(let s): return ("string with a control byte", .string(s + "\u{0}\u{7F}"))
            case .array(let a): return ("array doubled", .array(a + a))
            default: return ("object instead", .object(JSONObject([("x", old)])))
            }
        }
    }

    /// One or more value edits at random places of a document.
    mutating func mutateJSON(_ document: JSONValue, paths: [[PathStep]]? = nil) -> (String, JSONValue) {
        var allPaths: [[PathStep]] = []
        if let paths { allPaths = paths } else { Self.paths(document, into: &allPaths) }
        var value = document
        var described: [String] = []
        for _ in 0..<(chance(0.8) ? 1 : int(2..<5)) {
            let path = pick(allPaths)
            var what = ""
            value = Self.editing(value, at: path[...]) { old in
                let (name, new) = jsonReplacement(for: old)
                what = name
                return new
            } ?? .null
            described.append("\(path.map(\.description).joined()) \(what)")
        }
        return (described.joined(separator: "; "), value)
    }
}

/// What one reader's cases came to: errors by kind, and correct results.
final class FuzzTally {
    let reader: String
    private(set) var cases = 0
    private(set) var outcomes: [String: Int] = [:]

    init(_ reader: String) { self.reader = reader }

    /// Runs one case. The body either returns (it has checked that what it read is right) or throws; a thrown
    /// error must be one of the library's clear error types, whose description names the file or the place.
    func run(_ label: @autoclosure () -> String, file: StaticString = #filePath, line: UInt = #line, _ body: () throws -> Void) {
        cases += 1
        if Fuzzer.verbose { print("fuzz \(reader) case \(cases): \(label())"); fflush(stdout) }
        do {
            try body()
            outcomes["correct result", default: 0] += 1
        } catch {
            let kind = Self.kind(of: error)
            outcomes[kind ?? "other", default: 0] += 1
            let text = "\(error)"
            if kind == nil {
                XCTFail("\(reader) case \(cases) (\(label())): unexpected error type \(type(of: error)): \(text)", file: file, line: line)
            } else if text.contains("QLoRA.") || text.isEmpty {
                XCTFail("\(reader) case \(cases) (\(label())): message shows Swift internals: \(text)", file: file, line: line)
            }
        }
    }

    /// The kind of a clear error, or nil for anything else.
    static func kind(of error: Error) -> String? {
        switch error {
        case let e as FileFormatError: return e.file.isEmpty || e.place.isEmpty || e.message.isEmpty ? nil : "FileFormatError"
        case let e as UsageError: return e.message.isEmpty ? nil : "UsageError"
        case let e as DatasetLineError: return e.line > 0 && !e.message.isEmpty ? "DatasetLineError" : nil
        case let e as JSONParseError: return e.offset >= 0 ? "JSONParseError" : nil
        case let e as ChatTemplateError: return e.line >= 1 ? "ChatTemplateError.\(e.kind)" : nil
        default: return nil
        }
    }

    /// Prints the counts (docs/RELIABILITY.md quotes them) and checks that the cases did not all end the same way.
    func finish(file: StaticString = #filePath, line: UInt = #line) {
        let parts = outcomes.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        print("fuzz \(reader): \(cases) cases: \(parts)")
        XCTAssertGreaterThan(cases, 0, file: file, line: line)
    }
}

/// Reads a fixture file's bytes.
func fixtureBytes(_ relative: String) throws -> [UInt8] {
    Array(try Data(contentsOf: URL(fileURLWithPath: TestFixtures.path(relative))))
}

/// Parses JSON text that a test expects to be valid.
func fixtureJSON(_ relative: String) throws -> JSONValue {
    try JSONValue.parse(bytes: try fixtureBytes(relative))
}
