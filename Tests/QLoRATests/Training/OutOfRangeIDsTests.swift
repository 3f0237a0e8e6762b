import XCTest
@testable import QLoRA

/// Ids outside the model's vocabulary are refused before anything indexes by them (once an out-of-bounds read,
/// or a bad pointer for ids far outside).
final class OutOfRangeIDsTests: XCTestCase {
    func testTheCPULossAndBackwardRefuseAnOutOfRangeLabel() throws {
        let model = try LlamaForwardTests.loadTinyLlama()
        try model.attachLoRA(LoRAConfig(rank: 4, alpha: 8, dropout: 0, targetModules: LoRAConfig.llamaProjections), seed: 1)
        for label: Int32 in [1000, 5000, -7, Int32.max] {
            var batch = TrainingBatch(examples: [([1, 2, 3], [1, 2, 3])], length: 3, padID: 0)
            batch.labels[2] = label
            batch.origins = [ExampleOrigin(file: "train.jsonl", line: 4)]
            let expected = "label \(label) is outside the vocabulary (0..<1000) and is not -100 (train.jsonl line 4)"
            XCTAssertThrowsError(try model.loss(batch: batch)) { XCTAssertEqual("\($0)", expected) }
            XCTAssertThrowsError(try model.accumulateGradients(batch: batch, into: LoRAGradients(model: model), normalizer: 2)) {
                XCTAssertEqual("\($0)", expected)
            }
        }
        var batch = TrainingBatch(examples: [([1, 2, 3], [1, 2, 3])], length: 3, padID: 0)
        batch.tokens[0] = 1000
        XCTAssertThrowsError(try model.loss(batch: batch)) { XCTAssertEqual("\($0)", "token id 1000 is outside the vocabulary (0..<1000)") }
    }

    /// Examples handed to the trainer directly (not through a dataset file) are checked too, before batching narrows them to Int32.
    func testTheTrainerRefusesExamplesOutsideTheModelVocabulary() throws {
        var c = TrainingConfiguration()
        c.model = TestFixtures.path("tiny-llama/base")
        c.datasets = ["train.jsonl"]
        c.outputDirectory = try TestFixtures.temporaryDirectory()
        c.maxSteps = 1
        let good = TokenizedExample(tokens: [1, 2, 3], labels: [1, 2, 3], line: 1, file: "train.jsonl")
        var far = good
        far.line = 2
        far.labels[2] = 1 << 40
        var mismatched = good
        mismatched.line = 3
        mismatched.labels.removeLast()
        for (bad, message) in [(far, "train.jsonl: line 2: label 1099511627776 is outside the model's vocabulary (0..<1000) and is not -100"),
                               (mismatched, "train.jsonl: line 3: 3 token ids but 2 labels")] {
            XCTAssertThrowsError(try Trainer(configuration: c, model: LlamaForwardTests.loadTinyLlama(), train: [good, bad], eval: [],
                                             padID: 0, baseDirectory: nil)) { XCTAssertEqual("\($0)", message) }
        }
    }
}
