import XCTest
@testable import QLoRA

/// `qlora --version` and `qlora train --report-to`, as a user types them.
extension CommandLineTests {
    func testVersionNamesTheVersionAndTheCommit() throws {
        let result = try qlora(["--version"])
        XCTAssertEqual(result.status, 0, result.err)
        let line = result.out.trimmingCharacters(in: .whitespacesAndNewlines)
        // A plain `swift build` knows no commit; scripts/build_wheel.sh embeds it (scripts/check_wheel.sh checks that).
        XCTAssertTrue(line.hasPrefix("qlora \(QLoRAVersion.version) (commit ") && line.hasSuffix(")"), line)
    }

    func testReportToTensorBoardWritesEventFilesInsteadOfMetricsJSONL() throws {
        let model = TestFixtures.path("tiny-llama/base")
        let data = try writeData((0..<4).map { i in #"{"input_ids": [\#(i + 1), 20, 30, 40, 50]}"# })
        let out = try TestFixtures.temporaryDirectory() + "/run"
        let train = try qlora(["train", "--model", model, "--data", data, "--max-steps", "2", "--batch-size", "2", "--logging-steps", "1",
                               "--output", out, "--device", "cpu", "--report-to", "tensorboard"])
        XCTAssertEqual(train.status, 0, train.err)
        XCTAssertTrue(train.err.contains("tensorboard --logdir \(out)/runs"), train.err)
        XCTAssertFalse(FileSystem.exists(out + "/metrics.jsonl"), "jsonl was not asked for")
        let files = try FileSystem.listDirectory(out + "/runs")
        XCTAssertEqual(files.count, 1)
        let file = try XCTUnwrap(files.first)
        XCTAssertTrue(file.hasPrefix("events.out.tfevents."), file)
        let records = TFRecord.records(in: try FileSystem.readFile(out + "/runs/" + file)).records
        XCTAssertEqual(records.map { TensorBoardEvent.step(of: $0.data) }, [0, 1, 2])
        XCTAssertTrue(String(decoding: records[2].data, as: UTF8.self).contains("train/loss"))

        let bad = try qlora(["train", "--model", model, "--data", data, "--output", out + "2", "--report-to", "tensorboard,wandb"])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.err.contains("--report-to tensorboard,wandb: unknown value 'wandb' (wandb is a transformers integration we do not have); "
                                       + "expected tensorboard, jsonl, all or none"), bad.err)
    }
}
