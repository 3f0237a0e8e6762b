import XCTest
@testable import QLoRA

/// The JSON readers (tokenizer.json + tokenizer_config.json, config.json, adapter_config.json) on edited values
/// and types, and on byte mutations of the text: each case is a clear error or a reader that then works.
final class JSONReadersFuzzTests: XCTestCase {
    /// A document edited as JSON (most cases) or as bytes (then parsed, which may itself fail).
    static func mutated(_ document: JSONValue, text: [UInt8], paths: [[Fuzzer.PathStep]], _ fuzzer: inout Fuzzer,
                        file: String) throws -> (String, () throws -> JSONValue) {
        if fuzzer.chance(0.75) {
            let (label, value) = fuzzer.mutateJSON(document, paths: paths)
            // Through the text too, as a file would arrive.
            let bytes = Array(value.serialized().utf8)
            return (label, { try parseAsFile(bytes, file: file) })
        }
        let (label, bytes) = fuzzer.mutateBytes(text)
        return (label, { try parseAsFile(bytes, file: file) })
    }

    /// Parses bytes as a reader of `file` does: invalid JSON becomes a FileFormatError naming the byte.
    static func parseAsFile(_ bytes: [UInt8], file: String) throws -> JSONValue {
        do { return try JSONValue.parse(bytes: bytes) } catch let e as JSONParseError {
            throw FileFormatError(file: file, place: "byte \(e.offset)", e.message)
        }
    }

    func testMutatedTokenizerFilesAreClearErrorsOrEncodeAndDecode() throws {
        let fixtures = ["bytelevel-bpe/gpt2", "bytelevel-bpe/llama3", "sentencepiece-bpe/metaspace", "sentencepiece-bpe/legacy"]
        let texts = ["Hello world", "  leading spaces\n\ttabs", "héllo 123 <|endoftext|> \u{1F600}", "", "\u{0}\u{FFFD}x"]
        var fuzzer = Fuzzer(seed: 0x70CE_4123)
        let tally = FuzzTally("tokenizer.json")
        let perFixture = max(1, Fuzzer.cases(600) / fixtures.count)
        for fixture in fixtures {
            let text = try fixtureBytes(fixture + "/tokenizer.json")
            let json = try JSONValue.parse(bytes: text)
            let configText = try fixtureBytes(fixture + "/tokenizer_config.json")
            let config = try JSONValue.parse(bytes: configText)
            var paths: [[Fuzzer.PathStep]] = [], configPaths: [[Fuzzer.PathStep]] = []
            Fuzzer.paths(json, into: &paths)
            Fuzzer.paths(config, into: &configPaths)
            // The vocab has most of the paths; give the structure (model type, merges, pre-tokenizer, ...) a fair share.
            let structural = paths.filter { !($0.count >= 3 && "\($0[1])" == ".vocab") }
            for _ in 0..<perFixture {
                let editConfig = fuzzer.chance(0.2)
                let (label, read) = editConfig
                    ? try Self.mutated(config, text: configText, paths: configPaths, &fuzzer, file: "tokenizer_config.json")
                    : try Self.mutated(json, text: text, paths: fuzzer.chance(0.7) ? structural : paths, &fuzzer, file: "tokenizer.json")
                tally.run("\(fixture) \(editConfig ? "config " : "")\(label)") {
                    let tokenizer = editConfig
                        ? try Tokenizer(json: json, config: try read(), source: "tokenizer.json")
                        : try Tokenizer(json: try read(), config: config, source: "tokenizer.json")
                    for t in texts {
                        let ids = tokenizer.encode(t, addSpecialTokens: true)
                        XCTAssertTrue(ids.allSatisfy { $0 >= 0 && $0 < tokenizer.vocabularySize }, "\(label): \(t) → \(ids)")
                        _ = tokenizer.decode(ids)
                    }
                    _ = tokenizer.decode([-1, 0, tokenizer.vocabularySize - 1, tokenizer.vocabularySize, Int.max, Int.min], skipSpecialTokens: true)
                }
            }
        }
        tally.finish()
    }

    func testMutatedModelConfigsAreClearErrorsOrConsistent() throws {
        let fixtures = ["tiny-llama/base/config.json", "tiny-llama/base-bnb-nf4/config.json", "tiny-qwen2/config.json",
                        "smollm2-tokenizer/config.json"]
        var fuzzer = Fuzzer(seed: 0xC0F1_6)
        let tally = FuzzTally("config.json")
        let perFixture = max(1, Fuzzer.cases(600) / fixtures.count)
        for fixture in fixtures {
            let text = try fixtureBytes(fixture)
            let json = try JSONValue.parse(bytes: text)
            var paths: [[Fuzzer.PathStep]] = []
            Fuzzer.paths(json, into: &paths)
            for _ in 0..<perFixture {
                let (label, read) = try Self.mutated(json, text: text, paths: paths, &fuzzer, file: "config.json")
                tally.run("\(fixture) \(label)") {
                    let config = try DecoderConfig(json: try read(), file: "config.json")
                    // What the model derives from a config that was accepted must hold together.
                    XCTAssertGreaterThan(config.headDim, 0)
                    XCTAssertGreaterThan(config.kvHeadCount, 0)
                    XCTAssertEqual(config.headCount % config.kvHeadCount, 0)
                    XCTAssertEqual(config.ropeInverseFrequencies().count, config.headDim / 2)
                }
            }
        }
        tally.finish()
    }

    func testMutatedAdapterConfigsAreClearErrorsOrConsistent() throws {
        let text = try fixtureBytes("tiny-llama/adapter/adapter_config.json")
        let json = try JSONValue.parse(bytes: text)
        var paths: [[Fuzzer.PathStep]] = []
        Fuzzer.paths(json, into: &paths)
        var fuzzer = Fuzzer(seed: 0xADA9_7E4)
        let tally = FuzzTally("adapter_config.json")
        for _ in 0..<Fuzzer.cases(500) {
            let (label, read) = try Self.mutated(json, text: text, paths: paths, &fuzzer, file: "adapter_config.json")
            tally.run(label) {
                let config = try LoRAConfig(json: try read(), file: "adapter_config.json")
                XCTAssertGreaterThan(config.rank, 0)
                XCTAssertFalse(config.targetModules.isEmpty)
                // Written back, it reads as the same configuration.
                XCTAssertEqual(try LoRAConfig(json: config.json(), file: "written"), config)
            }
        }
        tally.finish()
    }
}
