import XCTest
@testable import QLoRA

/// Paths of the reference fixtures committed under Tests/Fixtures (copied from the reference stack's outputs).
enum TestFixtures {
    static let root: String = {
        var parts = "\(#filePath)".split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)  // Support/TestFixtures.swift, QLoRATests
        return parts.joined(separator: "/") + "/Fixtures"
    }()

    static func path(_ relative: String) -> String { root + "/" + relative }

    static var tinyLlama: String { path("tiny-llama") }
    static var smolTokenizer: String { path("smollm2-tokenizer") }

    /// A fresh temporary directory for one test.
    static func temporaryDirectory(_ name: String = #function) throws -> String {
        let clean = name.filter { $0.isLetter || $0.isNumber }
        let dir = NSTemporaryDirectory() + "qlora-test-\(clean)-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }
}

/// ‖a − b‖ / ‖b‖, the relative error the fixtures README asks for.
func relativeError(_ a: [Float], _ b: [Float]) -> Double {
    precondition(a.count == b.count, "length \(a.count) vs \(b.count)")
    var diff = 0.0, norm = 0.0
    for i in a.indices {
        let d = Double(a[i]) - Double(b[i])
        diff += d * d
        norm += Double(b[i]) * Double(b[i])
    }
    return norm == 0 ? diff.squareRoot() : (diff / norm).squareRoot()
}
