import XCTest
@testable import QLoRA

/// JSONL files as editors and other platforms write them: CRLF or CR line endings, a byte-order mark.
final class JSONLLineEndingsTests: XCTestCase {
    func load(_ bytes: [UInt8], _ formatting: SFTFormatting = SFTFormatting()) throws -> SFTDataset {
        try SFTDataset(jsonl: bytes, source: "data.jsonl", tokenizer: SFTDatasetTests.tokenizer, template: SFTDatasetTests.template,
                       formatting: formatting)
    }

    let lines = [#"{"text": "one"}"#, #"{"text": "two"}"#, #"{"prompt": "three", "completion": " four"}"#]

    func testCRLFCRAndLFGiveTheSameExamples() throws {
        let lf = try load(Array(lines.joined(separator: "\n").utf8))
        XCTAssertEqual(lf.examples.count, 3)
        for ending in ["\r\n", "\r"] {
            let other = try load(Array((lines.joined(separator: ending) + ending).utf8))
            XCTAssertEqual(other.examples.map(\.tokens), lf.examples.map(\.tokens), ending.debugDescription)
            XCTAssertEqual(other.examples.map(\.line), [1, 2, 3], ending.debugDescription)
        }
    }

    func testAByteOrderMarkIsSkipped() throws {
        let data = try load([0xEF, 0xBB, 0xBF] + Array(lines.joined(separator: "\r\n").utf8))
        XCTAssertEqual(data.examples.count, 3)
        XCTAssertEqual(data.examples[0].tokens, SFTDatasetTests.tokenizer.encode("one") + [SFTDatasetTests.tokenizer.eosTokenID!])
    }

    func testLineNumbersCountCRLFLinesAndBlankLines() throws {
        let text = [lines[0], "", lines[1], #"{"text": broken"#].joined(separator: "\r\n")
        XCTAssertThrowsError(try load(Array(text.utf8))) { error in
            XCTAssertEqual((error as? DatasetLineError)?.line, 4, "\(error)")
        }
    }

    func testInvalidUTF8IsAnErrorNamingTheLine() throws {
        let bytes = Array((lines[0] + "\n").utf8) + Array(#"{"text": "a"#.utf8) + [0xFF, 0xFE] + Array(#""}"#.utf8)
        XCTAssertThrowsError(try load(bytes)) { error in
            XCTAssertEqual("\(error)", "data.jsonl: line 2: not valid UTF-8")
        }
    }

    func testAFolderGivenAsTheDatasetIsNamed() throws {
        let dir = try TestFixtures.temporaryDirectory()
        XCTAssertThrowsError(try SFTDataset(path: dir, tokenizer: nil, template: nil, formatting: SFTFormatting())) { error in
            XCTAssertEqual("\(error)", "dataset \(dir) is a folder; expected a JSONL file")
        }
    }
}
