import XCTest
@testable import QLoRA

/// The real `tensorboard` package (pip) reads back every scalar a short CPU training wrote, at its step and with its
/// value, while the run goes and across a resume that redoes steps. tensorboard is installed with pip into .build/pydeps (kept there for
/// later runs); the test is skipped, saying why, only when pip cannot reach its package index.
final class TensorBoardReaderTests: XCTestCase {
    static let packageRoot: String = {
        var parts = TestFixtures.root.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(2)  // Tests/Fixtures
        return parts.joined(separator: "/")
    }()
    static let python = ProcessInfo.processInfo.environment["QLORA_PYTHON"] ?? "python3"

    /// .build/pydeps with tensorboard in it, installed on first use.
    func tensorboardPath() throws -> String {
        let target = Self.packageRoot + "/.build/pydeps"
        if FileSystem.exists(target + "/tensorboard/backend/event_processing/event_accumulator.py") { return target }
        let status = try Subprocess.run([Self.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                         "--target", target, "tensorboard"])
        if status == 0 { return target }
        // Is the failure pip's network? Ask the same index for the package alone.
        let probe = try TestFixtures.temporaryDirectory()
        if try Subprocess.run([Self.python, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                               "-d", probe, "tensorboard"]) != 0 {
            print("TensorBoardReaderTests skipped: pip cannot download tensorboard (no network to the package index?)")
            throw XCTSkip("pip cannot download tensorboard (no network to the package index?)")
        }
        XCTFail("`\(Self.python) -m pip install --target \(target) tensorboard` failed (exit status \(status)) though pip can download it")
        throw XCTSkip("tensorboard is not installed")
    }

    static let reader = """
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logdir, out = sys.argv[2], sys.argv[3]
    accumulator = EventAccumulator(logdir, size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = {tag: [[e.step, e.value] for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    Loader = getattr(event_file_loader, "LegacyEventFileLoader", event_file_loader.EventFileLoader)
    raw = []
    for name in sorted(os.listdir(logdir)):
        for event in Loader(os.path.join(logdir, name)).Load():
            kind = "version" if event.file_version else "start" if event.HasField("session_log") else "summary"
            raw.append({"file": name, "step": event.step, "kind": kind, "version": event.file_version,
                        "status": event.session_log.status, "tags": [v.tag for v in event.summary.value]})
    json.dump({"scalars": scalars, "raw": raw}, open(out, "w"))
    """

    /// TrainerTests' tiny-fixture trainer on 8 training examples.
    func trainer(_ c: TrainingConfiguration) throws -> Trainer {
        try TrainerTests(name: "trainer", testClosure: { _ in }).makeTrainer(c, trainingExamples: 8)
    }

    func testTensorBoardReadsEveryScalarAcrossAResume() throws {
        let pydeps = try tensorboardPath()
        let dir = try TestFixtures.temporaryDirectory()
        // TrainerTests' run on the tiny fixture, 4 steps, evaluated and saved every 2, reported everywhere.
        var c = TrainerTests(name: "configuration", testClosure: { _ in }).configuration(dir)
        c.loraDropout = 0.05
        c.gradientAccumulationSteps = 1
        c.maxSteps = 4
        c.warmupSteps = 0
        c.evalSteps = 2
        c.saveSteps = 2
        c.saveTotalLimit = 0
        c.optimizer = "adamw"
        c.seed = 42
        c.reportTo = .all
        let script = dir + "/read_events.py", out = dir + "/events.json"
        try Self.reader.write(toFile: script, atomically: true, encoding: .utf8)
        // While the run goes (after step 2 of 4, the event file still open), TensorBoard already reads steps 1 and 2.
        let first = try trainer(c)
        var readWhileRunning: JSONValue?
        first.shouldStop = { step in
            if step == 2, (try? Subprocess.run([Self.python, script, pydeps, dir + "/runs", out])) == 0 {
                readWhileRunning = try? JSONValue.parse(bytes: FileSystem.readFile(out))
            }
            return false
        }
        _ = try first.run()
        let early = try XCTUnwrap(readWhileRunning?["scalars"]?["train/loss"]?.array, "the reader failed during the run")
        XCTAssertEqual(early.compactMap { $0.array?.first?.int }, [1, 2])
        XCTAssertEqual(readWhileRunning?["scalars"]?["eval/loss"]?.array?.count, 1)
        // As if the first run were killed after logging steps 3 and 4 but before its step-4 checkpoint: the resumed run
        // (now to step 6) starts again after step 2 and logs steps 3 and 4 anew.
        try FileManager.default.removeItem(atPath: dir + "/checkpoint-4")
        c.resume = true
        c.maxSteps = 6
        let resumed = try trainer(c)
        _ = try resumed.run()
        XCTAssertEqual(resumed.history.map(\.step), Array(1...6))

        XCTAssertEqual(try Subprocess.run([Self.python, script, pydeps, dir + "/runs", out]), 0, "the tensorboard reader failed")
        let read = try JSONValue.parse(bytes: FileSystem.readFile(out))

        // What metrics.jsonl says for each step, the resumed run's line where a step was logged twice.
        var expected: [String: [Int: Double]] = [:]
        for line in try FileSystem.readText(dir + "/metrics.jsonl").split(separator: "\n") {
            let object = try XCTUnwrap(try JSONValue.parse(String(line)).object)
            let step = try XCTUnwrap(object["step"]?.int)
            for (key, value) in object where key != "step" {
                expected[key.hasPrefix("eval_") ? "eval/" + key.dropFirst(5) : "train/" + key, default: [:]][step] = value.double
            }
        }
        XCTAssertEqual(Set(expected.keys), ["train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
                                            "train/epoch", "eval/loss", "eval/perplexity"])
        let scalarsObject = try XCTUnwrap(read["scalars"]?.object)
        XCTAssertEqual(Set(scalarsObject.keys), Set(expected.keys))
        var scalars: [String: [(step: Int, value: Double)]] = [:]
        for (tag, list) in scalarsObject {
            scalars[tag] = (list.array ?? []).map { ($0.array?.first?.int ?? -1, $0.array?.last?.double ?? .nan) }
        }
        for (tag, byStep) in expected {
            let points = try XCTUnwrap(scalars[tag], tag)
            XCTAssertEqual(points.map { $0.step }, byStep.keys.sorted(), "\(tag): each step once, in order")
            for (step, value) in points {
                XCTAssertEqual(Float(value), Float(try XCTUnwrap(byStep[step])), "\(tag) at step \(step)")
            }
        }
        XCTAssertEqual(expected["train/loss"]?.keys.sorted(), Array(1...6))
        XCTAssertEqual(expected["eval/loss"]?.keys.sorted(), [2, 4, 6])
        for record in resumed.history {
            let loss = try XCTUnwrap(scalars["train/loss"]?.first { $0.step == record.step }?.value)
            XCTAssertEqual(loss, record.loss, accuracy: 1e-5 * record.loss, "train/loss at step \(record.step)")
        }
        for (step, loss) in resumed.evalHistory {
            let read = try XCTUnwrap(scalars["eval/loss"]?.first { $0.step == step }?.value)
            XCTAssertEqual(read, loss, accuracy: 1e-5 * loss, "eval/loss at step \(step)")
        }

        // The files themselves: two, each opening with the file version; the second with a session start at step 3;
        // no (tag, step) written twice (the interrupted run's steps 3 and 4 were cut off the first file).
        let raw = try XCTUnwrap(read["raw"]?.array)
        let files = Array(Set(raw.compactMap { $0["file"]?.string })).sorted()
        XCTAssertEqual(files.count, 2, "\(files)")
        for file in files {
            let first = try XCTUnwrap(raw.first { $0["file"]?.string == file })
            XCTAssertEqual(first["version"]?.string, "brain.Event:2", file)
        }
        let secondFile = raw.filter { $0["file"]?.string == files[1] }
        XCTAssertEqual(secondFile[1]["kind"]?.string, "start")
        XCTAssertEqual(secondFile[1]["step"]?.int, 3)
        XCTAssertEqual(secondFile[1]["status"]?.int, 1)
        var seen = Set<String>()
        for event in raw where event["kind"]?.string == "summary" {
            for tag in event["tags"]?.array ?? [] {
                let key = "\(tag.string ?? "?")@\(event["step"]?.int ?? -1)"
                XCTAssertTrue(seen.insert(key).inserted, "\(key) written twice")
            }
        }
        XCTAssertEqual(seen.count, expected.values.reduce(0) { $0 + $1.count })
    }
}
