import XCTest
@testable import QLoRA

/// `input_ids`/`labels` lines: checked against the model's vocabulary, read without a tokenizer.
final class PreTokenizedRowsTests: XCTestCase {
    func load(_ jsonl: String, vocabularySize: Int? = 1000, tokenizer: Tokenizer? = nil) throws -> SFTDataset {
        try SFTDataset(jsonl: jsonl, source: "train.jsonl", tokenizer: tokenizer, template: nil, formatting: SFTFormatting(),
                       vocabularySize: vocabularySize)
    }

    func message(_ jsonl: String, vocabularySize: Int? = 1000) -> String {
        do { _ = try load(jsonl, vocabularySize: vocabularySize); return "no error" } catch { return "\(error)" }
    }

    func testReadsWithoutATokenizer() throws {
        let data = try load("""
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
        {"input_ids": [4, 5]}
        """)
        XCTAssertEqual(data.examples.map(\.tokens), [[1, 2, 3], [4, 5]])
        XCTAssertEqual(data.examples.map(\.labels), [[-100, 2, 3], [4, 5]])
        XCTAssertEqual(data.examples.map(\.file), ["train.jsonl", "train.jsonl"])
    }

    func testATextLineWithoutATokenizerIsNamed() {
        XCTAssertEqual(message("{\"input_ids\": [1]}\n{\"text\": \"hi\"}"),
                       "train.jsonl: line 2: only pre-tokenized lines (\"input_ids\") can be read without a tokenizer, and the model folder has no tokenizer.json")
    }

    func testIdsAreCheckedAgainstTheModelVocabularyNotTheTokenizers() throws {
        // The SmolLM2 tokenizer has 49152 entries; a model may have more rows (padded embeddings) or fewer.
        let tokenizer = SFTDatasetTests.tokenizer
        let big = try load(#"{"input_ids": [1, 49200], "labels": [-100, 49200]}"#, vocabularySize: 49280, tokenizer: tokenizer)
        XCTAssertEqual(big.examples[0].tokens, [1, 49200])
        XCTAssertThrowsError(try load(#"{"input_ids": [1, 999, 1000]}"#, vocabularySize: 1000, tokenizer: tokenizer)) { error in
            XCTAssertEqual("\(error)", "train.jsonl: line 1: \"input_ids\"[2] = 1000 is outside the model's vocabulary (0..<1000)")
        }
    }

    func testLabelsMustBeIgnoredOrInTheVocabulary() {
        XCTAssertEqual(message(#"{"input_ids": [1, 2], "labels": [-100, 1000]}"#),
                       "train.jsonl: line 1: \"labels\"[1] = 1000 is outside the model's vocabulary (0..<1000) and is not -100")
        XCTAssertEqual(message(#"{"input_ids": [1, 2], "labels": [-1, 2]}"#),
                       "train.jsonl: line 1: \"labels\"[0] = -1 is outside the model's vocabulary (0..<1000) and is not -100")
        // Far outside: once a bad pointer in the trainer.
        XCTAssertEqual(message("{\"input_ids\": [1]}\n{\"input_ids\": [1, 2], \"labels\": [2, 99999999999999]}"),
                       "train.jsonl: line 2: \"labels\"[1] = 99999999999999 is outside the model's vocabulary (0..<1000) and is not -100")
        XCTAssertEqual(message(#"{"input_ids": [-5]}"#),
                       "train.jsonl: line 1: \"input_ids\"[0] = -5 is outside the model's vocabulary (0..<1000)")
    }

    func testShapesAndTypes() {
        XCTAssertEqual(message(#"{"input_ids": [1, 2, 3], "labels": [1, 2]}"#),
                       "train.jsonl: line 1: \"labels\" has 2 values but \"input_ids\" has 3; they must be as long")
        XCTAssertEqual(message(#"{"input_ids": [1, 2.5]}"#), "train.jsonl: line 1: \"input_ids\"[1] must be an integer, not 2.5")
        XCTAssertEqual(message(#"{"input_ids": [1, "2"]}"#), "train.jsonl: line 1: \"input_ids\"[1] must be an integer, not \"2\"")
        XCTAssertEqual(message(#"{"input_ids": [1], "labels": [true]}"#), "train.jsonl: line 1: \"labels\"[0] must be an integer, not true")
        XCTAssertEqual(message(#"{"input_ids": 7}"#), "train.jsonl: line 1: \"input_ids\" must be an array of integers")
        XCTAssertEqual(message(#"{"input_ids": []}"#), "train.jsonl: line 1: \"input_ids\" is empty")
        // Integral floats are integers, as JSON has no integer type of its own.
        XCTAssertEqual(message(#"{"input_ids": [1, 2.0]}"#), "no error")
    }
}

extension PreTokenizedRowsTests {
    /// Text lines through a tokenizer whose ids do not fit the model: said on the line, not later as an index error.
    func testATokenizerThatDoesNotFitTheModelIsNamed() {
        XCTAssertThrowsError(try load(#"{"text": "The capital of France is Paris."}"#, vocabularySize: 1000, tokenizer: SFTDatasetTests.tokenizer)) {
            XCTAssertEqual("\($0)", "train.jsonl: line 1: the tokenizer gave token id 3575, outside the model's vocabulary (0..<1000): tokenizer.json does not belong to this model")
        }
    }
}
