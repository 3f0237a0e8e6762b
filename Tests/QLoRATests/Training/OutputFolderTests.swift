import XCTest
@testable import QLoRA

/// The output folder of a run: an earlier run is never silently replaced or mixed with a new one, `--resume` without
/// a checkpoint is an error, and a resumed run's metrics.jsonl has each step once.
final class OutputFolderTests: XCTestCase {
    let helper = TrainerTests(name: "helper", testClosure: { _ in })

    func run(_ c: TrainingConfiguration, stopAt: Int? = nil) throws -> Trainer {
        let trainer = try helper.makeTrainer(c)
        if let stopAt { trainer.shouldStop = { $0 == stopAt } }
        _ = try trainer.run()
        return trainer
    }

    func metricSteps(_ dir: String) throws -> [Int] {
        try FileSystem.readText(dir + "/metrics.jsonl").split(separator: "\n").compactMap { line in
            let json = try JSONValue.parse(String(line))
            return json["loss"] != nil ? json["step"]?.int : nil
        }
    }

    func testAFolderWithAnEarlierRunIsRefusedWithoutResumeOrOverwrite() throws {
        let dir = try TestFixtures.temporaryDirectory()
        var c = helper.configuration(dir)
        c.maxSteps = 3
        _ = try run(c)
        let adapter = try FileSystem.readFile(dir + "/adapter_model.safetensors")
        c.seed = 99
        XCTAssertThrowsError(try run(c)) { error in
            XCTAssertTrue("\(error)".contains("holds an earlier run"), "\(error)")
            XCTAssertTrue("\(error)".contains("--overwrite"), "\(error)")
        }
        XCTAssertEqual(try FileSystem.readFile(dir + "/adapter_model.safetensors"), adapter, "the earlier adapter is untouched")
    }

    /// With overwrite the old run's checkpoints go first, so a later resume continues the new run only.
    func testOverwriteRemovesTheEarlierRunsCheckpointsAndMetrics() throws {
        let dir = try TestFixtures.temporaryDirectory()
        var c = helper.configuration(dir)
        c.saveTotalLimit = 0
        _ = try run(c)  // checkpoints 3 and 6
        XCTAssertEqual(try Checkpoints.steps(in: dir), [3, 6])
        c.overwriteOutputDirectory = true
        c.saveSteps = 2
        _ = try run(c, stopAt: 2)
        XCTAssertEqual(try Checkpoints.steps(in: dir), [2], "the old run's checkpoints are gone")
        XCTAssertEqual(try metricSteps(dir), [1, 2])
    }

    func testResumeWithoutACheckpointIsAnError() throws {
        let dir = try TestFixtures.temporaryDirectory()
        var c = helper.configuration(dir)
        c.resume = true
        XCTAssertThrowsError(try run(c)) { error in
            XCTAssertTrue("\(error)".contains("no valid checkpoint found in \(dir)"), "\(error)")
        }
        c.overwriteOutputDirectory = true
        XCTAssertThrowsError(try c.validate()) { XCTAssertTrue("\($0)".contains("give one"), "\($0)") }
    }

    /// Killed after step 4 was logged but before its checkpoint (the last is step 3), with a half-written line at
    /// the end: the resumed run's metrics.jsonl has steps 1...6 once each.
    func testResumeKeepsEachStepOnceInTheMetrics() throws {
        let dir = try TestFixtures.temporaryDirectory()
        let c = helper.configuration(dir)
        _ = try run(c, stopAt: 3)
        let text = try FileSystem.readText(dir + "/metrics.jsonl")
        try FileSystem.writeAtomically(dir + "/metrics.jsonl", text: text + "{\"step\": 4, \"loss\": 9.0}\n{\"step\": 5, \"lo")
        var resumed = c
        resumed.resume = true
        _ = try run(resumed)
        XCTAssertEqual(try metricSteps(dir), [1, 2, 3, 4, 5, 6])
    }

    func testACorruptTrainerStateNamesTheFile() throws {
        let dir = try TestFixtures.temporaryDirectory()
        var c = helper.configuration(dir)
        _ = try run(c, stopAt: 3)
        let state = dir + "/checkpoint-3/trainer_state.json"
        try FileSystem.writeAtomically(state, text: "{\"global_step\": 3,")
        c.resume = true
        XCTAssertThrowsError(try run(c)) { error in
            XCTAssertEqual((error as? FileFormatError)?.file, state, "\(error)")
        }
        try FileSystem.writeAtomically(state, text: "{\"global_step\": -3}")
        XCTAssertThrowsError(try run(c)) { error in
            XCTAssertTrue("\(error)".contains("'global_step': expected a non-negative integer, got -3"), "\(error)")
        }
    }

    /// Leftovers of a checkpoint write that was killed are removed, never taken for a checkpoint.
    func testLeftoversOfAnInterruptedCheckpointAreIgnoredAndRemoved() throws {
        let dir = try TestFixtures.temporaryDirectory()
        var c = helper.configuration(dir)
        _ = try run(c, stopAt: 3)
        try FileSystem.createDirectory(dir + "/checkpoint-6.tmp-12345")
        try FileSystem.writeAtomically(dir + "/checkpoint-6.tmp-12345/trainer_state.json", text: "{\"global_step\": 6}")
        XCTAssertEqual(try Checkpoints.steps(in: dir), [3])
        c.resume = true
        let trainer = try run(c)
        XCTAssertEqual(trainer.history.count, 6)
        XCTAssertFalse(FileSystem.exists(dir + "/checkpoint-6.tmp-12345"))
    }
}

extension OutputFolderTests {
    func testOnlyOurOwnSaveLeftoversAreRecognised() {
        for name in ["checkpoint-6.tmp-123", "checkpoint-6.partial", "best.tmp-77", "best.old-77", ".tmp-5", "checkpoint-12.old-9"] {
            XCTAssertTrue(Trainer.isSaveLeftover(name), name)
        }
        for name in ["notes.old-1.txt", "data.tmp-3", "checkpoint-6", "best", "checkpoint-x.tmp-1", "metrics.jsonl", ".partial", "best.tmp-"] {
            XCTAssertFalse(Trainer.isSaveLeftover(name), name)
        }
    }

    /// The command-line check runs before anything is loaded and says the same.
    func testTheEarlyCheckRefusesAnEarlierRunAndAResumeWithoutCheckpoint() throws {
        let dir = try TestFixtures.temporaryDirectory()
        var c = helper.configuration(dir)
        XCTAssertNoThrow(try Trainer.checkOutputDirectory(c))
        c.resume = true
        XCTAssertThrowsError(try Trainer.checkOutputDirectory(c)) { XCTAssertTrue("\($0)".contains("no valid checkpoint"), "\($0)") }
        c.resume = false
        try FileSystem.writeAtomically(dir + "/metrics.jsonl", text: "")
        XCTAssertThrowsError(try Trainer.checkOutputDirectory(c)) { XCTAssertTrue("\($0)".contains("holds an earlier run (metrics.jsonl)"), "\($0)") }
        c.overwriteOutputDirectory = true
        XCTAssertNoThrow(try Trainer.checkOutputDirectory(c))
    }
}

extension OutputFolderTests {
    /// Killed between moving the old best adapter aside and renaming the new one in: the next run puts the old one back.
    func testAFolderLeftAsideByAKillIsPutBack() throws {
        let dir = try TestFixtures.temporaryDirectory()
        var c = helper.configuration(dir)
        c.evalSteps = 1
        _ = try run(c, stopAt: 3)
        let best = try FileSystem.readFile(dir + "/best/adapter_model.safetensors")
        XCTAssertEqual(rename(dir + "/best", dir + "/best.old-4242"), 0)
        try FileSystem.createDirectory(dir + "/best.tmp-4242")
        c.resume = true
        c.maxSteps = 3
        _ = try run(c)
        XCTAssertEqual(try FileSystem.readFile(dir + "/best/adapter_model.safetensors"), best)
        XCTAssertFalse(FileSystem.exists(dir + "/best.old-4242") || FileSystem.exists(dir + "/best.tmp-4242"))
    }
}
