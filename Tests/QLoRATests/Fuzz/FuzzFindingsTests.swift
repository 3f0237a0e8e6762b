import XCTest
@testable import QLoRA

/// The crashes and unclear messages the fuzz suite found, each pinned by the smallest input that showed it.
/// With Swift's checks on (Package.swift), each of these was a trap that ended the process.
final class FuzzFindingsTests: XCTestCase {
    func render(_ source: String) throws -> String {
        try ChatTemplate(source: source).renderAllowingEmpty(messages: [], addGenerationPrompt: false, bosToken: nil, eosToken: nil)
    }

    func assertTemplateError(_ source: String, _ fragment: String, line: UInt = #line) {
        XCTAssertThrowsError(try render(source), line: line) { error in
            XCTAssertTrue("\(error)".contains(fragment), "\(error)", line: line)
            XCTAssertTrue(error is ChatTemplateError, "\(type(of: error))", line: line)
        }
    }

    func testTemplateIntegerEdgesAreErrorsNotTraps() throws {
        let intMin = "{% set x = -9223372036854775807 - 1 %}"
        assertTemplateError(intMin + "{{ -x }}", "integer overflow")
        assertTemplateError(intMin + "{{ x | abs }}", "integer overflow")
        // A range whose next step passes Int.max ends there, as Python's (unbounded) range would at `stop`.
        XCTAssertEqual(try render("{{ range(9223372036854775806, 9223372036854775807, 9223372036854775807) | list }}"),
                       "[9223372036854775806]")
    }

    func testIntFilterBaseOutsideTwoToThirtySixIsAnError() throws {
        assertTemplateError("{{ '12' | int(base=1) }}", "base must be >= 2 and <= 36, or 0")
        assertTemplateError("{{ '12' | int(base=37) }}", "base must be >= 2 and <= 36, or 0")
        // Base 0 takes the base from the prefix, as Python's int(s, 0).
        XCTAssertEqual(try render("{{ '0x1A' | int(base=0) }} {{ '0b11' | int(base=0) }} {{ '42' | int(base=0) }}"), "26 3 42")
    }

    func testSafeTensorsShapeMessageShowsTheValuesAsJSON() throws {
        let dir = try TestFixtures.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let header = Array(#"{"w": {"dtype": "F32", "shape": [2, "x"], "data_offsets": [0, 8]}}"#.utf8)
        let bytes = withUnsafeBytes(of: UInt64(header.count).littleEndian, Array.init) + header + [UInt8](repeating: 0, count: 8)
        try Data(bytes).write(to: URL(fileURLWithPath: dir + "/w.safetensors"))
        XCTAssertThrowsError(try SafeTensorsFile(path: dir + "/w.safetensors")) { error in
            XCTAssertTrue("\(error)".hasSuffix(#"tensor 'w': shape [2, "x"] has a non-integer or negative dimension"#), "\(error)")
            XCTAssertFalse("\(error)".contains("QLoRA."), "\(error)")
        }
    }

    /// 2^62 F32 elements fit in Int, their 2^64 bytes do not: the multiplication trapped.
    func testSafeTensorsShapeWhoseByteCountOverflowsIsAnError() throws {
        let dir = try TestFixtures.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let header = Array(#"{"w": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 8]}}"#.utf8)
        let bytes = withUnsafeBytes(of: UInt64(header.count).littleEndian, Array.init) + header + [UInt8](repeating: 0, count: 8)
        try Data(bytes).write(to: URL(fileURLWithPath: dir + "/w.safetensors"))
        XCTAssertThrowsError(try SafeTensorsFile(path: dir + "/w.safetensors")) { error in
            XCTAssertTrue("\(error)".hasSuffix("tensor 'w': shape [4611686018427387904] of F32 needs too many bytes but data_offsets give 8"), "\(error)")
        }
    }

    func testAdapterConfigWithAHugeIntegralAlphaWritesBack() throws {
        var json = try fixtureJSON("tiny-llama/adapter/adapter_config.json").object!
        json["lora_alpha"] = .double(1e300)
        let config = try LoRAConfig(json: .object(json), file: "adapter_config.json")
        // Int64(1e300) trapped; the value is written as the double it is.
        XCTAssertEqual(config.json()["lora_alpha"], .double(1e300))
        XCTAssertEqual(try LoRAConfig(json: config.json(), file: "written").alpha, 1e300)
    }

    func testZeroKeyValueHeadsIsAnError() throws {
        var json = try fixtureJSON("tiny-llama/base/config.json").object!
        json["num_key_value_heads"] = .int(0)
        XCTAssertThrowsError(try DecoderConfig(json: .object(json), file: "config.json")) { error in
            XCTAssertTrue(error is FileFormatError, "\(type(of: error))")
            XCTAssertTrue("\(error)".hasPrefix("config.json: 'num_key_value_heads'"), "\(error)")
        }
    }

    func testHeadDimOutsideItsRangeIsAnError() throws {
        for bad: Int64 in [0, -64, 1 << 40, 63] {
            var json = try fixtureJSON("tiny-llama/base/config.json").object!
            json["head_dim"] = .int(bad)
            XCTAssertThrowsError(try DecoderConfig(json: .object(json), file: "config.json")) { error in
                XCTAssertTrue(error is FileFormatError, "\(type(of: error))")
                XCTAssertTrue("\(error)".hasPrefix("config.json: 'head_dim'"), "\(error)")
            }
        }
    }

    func testNegativeSeedInYAMLIsAnError() throws {
        var configuration = TrainingConfiguration()
        XCTAssertThrowsError(try configuration.apply(try SimpleYAML.parse("seed: -1\n", file: "train.yaml"), file: "train.yaml")) { error in
            XCTAssertTrue(error is FileFormatError, "\(type(of: error))")
            XCTAssertTrue("\(error)".contains("'seed'"), "\(error)")
        }
    }
}
