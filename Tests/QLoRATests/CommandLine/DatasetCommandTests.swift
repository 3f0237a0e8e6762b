import XCTest
@testable import QLoRA

/// `train` and `eval` on data as users have it: pre-tokenized lines with CRLF endings and a byte-order mark, on a model
/// folder without tokenizer.json; data in which no token is counted.
extension CommandLineTests {
    func writeData(_ lines: [String], ending: String = "\n") throws -> String {
        let path = try TestFixtures.temporaryDirectory() + "/data.jsonl"
        try FileSystem.writeAtomically(path, bytes: [0xEF, 0xBB, 0xBF] + Array((lines.joined(separator: ending) + ending).utf8))
        return path
    }

    func testPreTokenizedDataTrainsAndEvaluatesWithoutATokenizer() throws {
        let model = TestFixtures.path("tiny-llama/base")  // config and weights only
        XCTAssertFalse(FileSystem.exists(model + "/tokenizer.json"))
        let data = try writeData((0..<4).map { i in #"{"input_ids": [\#(i + 1), 20, 30, 40, 50], "labels": [-100, 20, 30, 40, 50]}"# }, ending: "\r\n")
        let out = try TestFixtures.temporaryDirectory() + "/run"
        let train = try qlora(["train", "--model", model, "--data", data, "--max-steps", "2", "--batch-size", "2", "--output", out, "--device", "cpu"])
        XCTAssertEqual(train.status, 0, train.err)
        XCTAssertTrue(train.err.contains("data: 4 training examples (20 tokens)"), train.err)
        XCTAssertTrue(FileSystem.exists(out + "/adapter_model.safetensors"))
        let eval = try qlora(["eval", "--model", model, "--data", data, "--device", "cpu", "--json"])
        XCTAssertEqual(eval.status, 0, eval.err)
        XCTAssertEqual(try JSONValue.parse(eval.out.trimmingCharacters(in: .whitespacesAndNewlines))["tokens"], .int(16))
    }

    func testDataThatCountsNoTokenIsAnErrorForTrainAndEval() throws {
        let model = TestFixtures.path("tiny-llama/base")
        let data = try writeData((0..<3).map { _ in #"{"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, -100, -100, -100, 6]}"# })
        let expected = "3 of 3 examples lost their completion to truncation at max_seq_length 4 (the longest of their prompts is 5 tokens"
        let eval = try qlora(["eval", "--model", model, "--data", data, "--device", "cpu", "--max-seq-length", "4"])
        XCTAssertNotEqual(eval.status, 0)
        XCTAssertTrue(eval.err.contains(expected), eval.err)
        let out = try TestFixtures.temporaryDirectory() + "/run"
        let train = try qlora(["train", "--model", model, "--data", data, "--max-steps", "2", "--max-seq-length", "4", "--output", out, "--device", "cpu"])
        XCTAssertNotEqual(train.status, 0)
        XCTAssertTrue(train.err.contains("training data: no token is counted in the loss"), train.err)
        XCTAssertTrue(train.err.contains(expected), train.err)
        XCTAssertFalse(FileSystem.exists(out + "/adapter_model.safetensors"))
    }

    func testManyTruncatedExamplesAreAWarning() throws {
        let model = TestFixtures.path("tiny-llama/base")
        let short = #"{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}"#
        let long = #"{"input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "labels": [-100, 2, 3, 4, 5, 6, 7, 8, 9, 10]}"#
        let data = try writeData([short, short, short, long])
        let out = try TestFixtures.temporaryDirectory() + "/run"
        let train = try qlora(["train", "--model", model, "--data", data, "--max-steps", "1", "--max-seq-length", "6", "--output", out, "--device", "cpu"])
        XCTAssertEqual(train.status, 0, train.err)
        XCTAssertTrue(train.err.contains("warning: training data: 1 of 4 examples (25.0%) are longer than max_seq_length 6 and were cut"), train.err)
    }
}
