import XCTest
@testable import QLoRA

/// Data in which the loss counts no token is an error that says why; many truncated examples are a warning.
final class CountedTokensTests: XCTestCase {
    /// Pre-tokenized lines of `prompt` ignored tokens then `completion` counted ones, cut to `maxSeqLength`.
    func dataset(lines: Int, prompt: Int, completion: Int, maxSeqLength: Int, file: String = "train.jsonl") throws -> [TokenizedExample] {
        let line = #"{"input_ids": \#((0..<(prompt + completion)).map { 10 + $0 }), "labels": \#(Array(repeating: -100, count: prompt) + (0..<completion).map { 10 + prompt + $0 })}"#
        return try SFTDataset(jsonl: Array(repeating: line, count: lines).joined(separator: "\n"), source: file, tokenizer: nil, template: nil,
                              formatting: SFTFormatting(maxSequenceLength: maxSeqLength), vocabularySize: 1000).examples
    }

    func configuration(maxSeqLength: Int) throws -> TrainingConfiguration {
        var c = TrainingConfiguration()
        c.model = TestFixtures.path("tiny-llama/base")
        c.datasets = ["train.jsonl"]
        c.outputDirectory = try TestFixtures.temporaryDirectory()
        c.maxSeqLength = maxSeqLength
        c.maxSteps = 1
        return c
    }

    func testAllCompletionsCutByMaxSeqLengthIsAnErrorSayingWhy() throws {
        let train = try dataset(lines: 3, prompt: 10, completion: 2, maxSeqLength: 8)
        XCTAssertEqual(train.map(\.truncation?.completionLost), [true, true, true])
        XCTAssertThrowsError(try Trainer(configuration: configuration(maxSeqLength: 8), model: LlamaForwardTests.loadTinyLlama(),
                                         train: train, eval: [], padID: 0, baseDirectory: nil)) { error in
            XCTAssertEqual("\(error)", "training data: no token is counted in the loss, so there is nothing to learn or measure: 3 of 3 examples "
                           + "lost their completion to truncation at max_seq_length 8 (the longest of their prompts is 10 tokens: raise max_seq_length above it)")
        }
    }

    func testEvaluationDataWithoutCountedTokensIsAnError() throws {
        let train = try dataset(lines: 2, prompt: 2, completion: 4, maxSeqLength: 16)
        var eval = try dataset(lines: 2, prompt: 2, completion: 4, maxSeqLength: 16, file: "eval.jsonl")
        for i in eval.indices { eval[i].labels = eval[i].labels.map { _ in -100 } }
        XCTAssertThrowsError(try Trainer(configuration: configuration(maxSeqLength: 16), model: LlamaForwardTests.loadTinyLlama(),
                                         train: train, eval: eval, padID: 0, baseDirectory: nil)) { error in
            XCTAssertTrue("\(error)".hasPrefix("evaluation data: no token is counted in the loss"), "\(error)")
            XCTAssertTrue("\(error)".hasSuffix("2 of 2 examples have nothing to count (empty text, no assistant turn, or labels all -100: eval.jsonl lines 1, 2)"),
                          "\(error)")
        }
    }

    func testEmptyTextsAndConversationsWithoutAnAssistantTurnCountNothing() throws {
        let data = try SFTDataset(jsonl: """
        {"text": ""}
        {"messages": [{"role": "user", "content": "Hi"}]}
        {"prompt": "Capital of France?", "completion": " Paris."}
        """, source: "data.jsonl", tokenizer: SFTDatasetTests.tokenizer, template: SFTDatasetTests.template, formatting: SFTFormatting())
        let report = CountedTokensReport(data.examples)
        XCTAssertEqual(report.nothingToCount.map(\.line), [1, 2])
        XCTAssertGreaterThan(report.countedTokens, 0)
        XCTAssertEqual(report.warnings("data.jsonl", maxSeqLength: 1024),
                       ["warning: data.jsonl: 2 examples have no token the loss counts (empty text, no assistant turn, or labels all -100): data.jsonl lines 1, 2"])
        let none = CountedTokensReport(Array(data.examples.prefix(2)))
        XCTAssertEqual(none.countedTokens, 0)
        XCTAssertTrue(none.noCountedTokensError("data.jsonl", maxSeqLength: 1024).message.hasSuffix(
            "2 of 2 examples have nothing to count (empty text, no assistant turn, or labels all -100: data.jsonl lines 1, 2)"))
    }

    func testTruncationWarnings() throws {
        // 1 of 10 cut (10% > 5%), its completion kept.
        let some = try dataset(lines: 9, prompt: 2, completion: 4, maxSeqLength: 8) + dataset(lines: 1, prompt: 2, completion: 10, maxSeqLength: 8)
        XCTAssertEqual(CountedTokensReport(some).warnings("training data", maxSeqLength: 8),
                       ["warning: training data: 1 of 10 examples (10.0%) are longer than max_seq_length 8 and were cut"])
        // 1 of 30 cut (3.3%), but it lost its whole completion: it counts nothing, which is worth saying.
        let lost = try dataset(lines: 29, prompt: 2, completion: 4, maxSeqLength: 8) + dataset(lines: 1, prompt: 9, completion: 2, maxSeqLength: 8)
        XCTAssertEqual(CountedTokensReport(lost).warnings("training data", maxSeqLength: 8),
                       ["warning: training data: 1 examples lost their whole completion to max_seq_length 8 and count nothing "
                        + "(the longest of their prompts is 9 tokens): train.jsonl line 1"])
        XCTAssertEqual(CountedTokensReport(try dataset(lines: 30, prompt: 2, completion: 4, maxSeqLength: 8)).warnings("training data", maxSeqLength: 8), [])
    }

    func testOriginsAreDescribedByFileAndLine() {
        let origins = [ExampleOrigin(file: "train.jsonl", line: 57), ExampleOrigin(file: "train.jsonl", line: 12), ExampleOrigin(file: "b.jsonl", line: 3)]
        XCTAssertEqual(ExampleOrigin.describe(origins), "train.jsonl lines 12, 57; b.jsonl line 3")
        let many = (1...20).map { ExampleOrigin(file: "a.jsonl", line: $0) }
        XCTAssertEqual(ExampleOrigin.describe(many, limit: 3), "a.jsonl lines 1, 2, 3, … (20 in all)")
    }
}
