import XCTest
@testable import QLoRA

/// The tokenizer.* keys of the family GGUF exports against what llama.cpp's own converter (its set_vocab, run with
/// --vocab-only) writes for the same folders (Tests/Fixtures/gguf-tokenizers, scripts/make_gguf_tokenizer_fixtures.py):
/// SentencePiece tokenizer.model folders of Gemma 2/3 and Phi-3, byte-level BPE of Qwen3 and Phi-4-mini.
final class GGUFTokenizerFamilyTests: XCTestCase {
    static let cases: [(folder: String, family: GGUFFamily, model: String)] = [
        ("gemma2", .gemma2, "llama"), ("gemma3", .gemma3, "llama"), ("phi3", .phi3, "llama"),
        ("qwen3", .qwen3, "gpt2"), ("phi4-mini", .phi3, "gpt2"),
    ]

    /// Why `ours` is not the converter's `expected` ({"type", "value"} or {"type": "ARRAY", "array_of", "value"}); nil
    /// when it is.
    static func difference(_ ours: GGUFValue, _ expected: JSONValue) -> String? {
        func scalar(_ v: GGUFValue, _ typeName: String?, _ e: JSONValue?) -> String? {
            guard "\(v.type)".uppercased() == typeName else { return "type \(v.type), expected \(typeName ?? "none")" }
            switch v {
            case .string(let s): return s == e?.string ? nil : "\(s.debugDescription), expected \(e?.string?.debugDescription ?? "nil")"
            case .bool(let b): return b == e?.bool ? nil : "\(b), expected \(String(describing: e))"
            case .float32(let f): return e?.double.map { Float($0) } == f ? nil : "\(f), expected \(String(describing: e?.double))"
            default: return v.int != nil && v.int == e?.int ? nil : "\(v), expected \(String(describing: e))"
            }
        }
        guard case .array(let elementType, let values) = ours else { return scalar(ours, expected["type"]?.string, expected["value"]) }
        guard expected["type"]?.string == "ARRAY" else { return "an array, expected \(expected["type"]?.string ?? "none")" }
        let reference = expected["value"]?.array ?? []
        guard values.count == reference.count else { return "\(values.count) elements, expected \(reference.count)" }
        for (i, (v, e)) in zip(values, reference).enumerated() {
            if let why = scalar(v, expected["array_of"]?.string, e) { return "element \(i) (of \(elementType)): \(why)" }
        }
        return nil
    }

    /// Key by key, in the converter's order: every key present, none extra, each value type and value the same.
    func testTokenizerKeysAreWhatLlamaCppsConverterWrites() throws {
        for c in Self.cases {
            let dir = TestFixtures.path("gguf-tokenizers/" + c.folder)
            let config = try JSONValue.parse(bytes: try FileSystem.readFile(dir + "/config.json"))
            let vocabulary = try XCTUnwrap(config["vocab_size"]?.int)
            let ours = try GGUFTokenizerMetadata(family: c.family, directory: dir, vocabularySize: vocabulary, log: { _ in })
            XCTAssertEqual(ours.model, c.model, c.folder)
            let expected = try XCTUnwrap(JSONValue.parse(bytes: try FileSystem.readFile(dir + "/expected.json"))["keys"]?.array)
            let expectedKeys = expected.compactMap { $0["key"]?.string }
            XCTAssertEqual(ours.entries.map(\.key), expectedKeys, "\(c.folder): the keys and their order")
            for e in expected {
                let key = try XCTUnwrap(e["key"]?.string)
                guard let value = ours.entries.first(where: { $0.key == key })?.value else {
                    XCTFail("\(c.folder): \(key) is missing"); continue
                }
                if let why = Self.difference(value, e) { XCTFail("\(c.folder): \(key): \(why)") }
            }
        }
    }

    /// The SentencePiece reader against the fixture's model (what sentencepiece itself reports, through the
    /// converter's output), and its refusals of damaged files.
    func testTheSentencePieceReader() throws {
        let path = TestFixtures.path("gguf-tokenizers/gemma2/tokenizer.model")
        let model = try SentencePieceModel(path: path)
        XCTAssertEqual(model.pieces.count, 420)
        XCTAssertEqual(model.pieces[4], .init(text: "<ctrl9>", score: 0, type: .control))
        XCTAssertEqual(model.pieces[5].type, .userDefined)
        XCTAssertEqual(model.pieces[9], .init(text: "<unused1>", score: 0, type: .userDefined))
        XCTAssertEqual(model.pieces[10], .init(text: "<0x00>", score: 0, type: .byte))
        XCTAssertTrue(model.pieces[300...].allSatisfy { $0.type == .normal && $0.score < 0 })

        let bytes = try FileSystem.readFile(path)
        func refusal(_ bytes: [UInt8]) -> FileFormatError? {
            do { _ = try SentencePieceModel(bytes: bytes, file: "t.model"); return nil } catch { return error as? FileFormatError }
        }
        // Cut inside the pieces: a length runs past the end.
        let cut = try XCTUnwrap(refusal(Array(bytes.prefix(1000))))
        XCTAssertTrue(cut.message.contains("bytes") && cut.place.contains("ModelProto"), "\(cut)")
        XCTAssertNotNil(refusal([]), "an empty file has no pieces")
        // A piece whose type is 9.
        let badType = try XCTUnwrap(refusal([0x0a, 0x05, 0x0a, 0x01, 0x61, 0x18, 0x09]))
        XCTAssertTrue(badType.place.hasPrefix("ModelProto.pieces[0]") && badType.message.contains("9"), "\(badType)")
        // A score with the wrong wire type (varint instead of 32-bit).
        let badScore = try XCTUnwrap(refusal([0x0a, 0x05, 0x0a, 0x01, 0x61, 0x10, 0x01]))
        XCTAssertTrue(badScore.message.contains("wire type 0"), "\(badScore)")
        // A group (wire type 3) at the top level.
        XCTAssertNotNil(refusal([0x0a, 0x03, 0x0a, 0x01, 0x61, 0x13]))
        // A varint that never ends.
        XCTAssertNotNil(refusal([0x0a] + [UInt8](repeating: 0xff, count: 12)))
        // Invalid UTF-8 in a piece.
        XCTAssertNotNil(refusal([0x0a, 0x04, 0x0a, 0x02, 0xc3, 0x28]))
        XCTAssertEqual(try SentencePieceModel(bytes: [0x0a, 0x05, 0x0a, 0x01, 0x61, 0x18, 0x02], file: "t").pieces,
                       [.init(text: "a", score: 0, type: .unknown)])
    }
}
