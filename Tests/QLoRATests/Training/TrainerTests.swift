import XCTest
@testable import QLoRA

final class PackingTests: XCTestCase {
    /// A packed row gives every example the same loss as a row of its own.
    func testPackedAndUnpackedBatchesGiveTheSameLoss() throws {
        let model = try LlamaForwardTests.loadTinyLlama()
        try PEFTAdapter.load(directory: TestFixtures.path("tiny-llama/adapter"), into: model)
        var rng = SeededGenerator(seed: 3)
        let examples = [5, 9, 7].enumerated().map { (i, n) -> TokenizedExample in
            let tokens = (0..<n).map { _ in Int(rng.next() % 1000) }
            return TokenizedExample(tokens: tokens, labels: tokens.enumerated().map { $0.offset < 2 ? -100 : $0.element }, line: i + 1)
        }
        var separate = 0.0, separateCount = 0
        for e in examples {
            let loss = try model.loss(batch: TrainingBatch(examples: [(e.tokens, e.labels)], length: e.tokens.count, padID: 0))
            separate += loss.sum
            separateCount += loss.count
        }
        let rows = Batching.packedRows(examples, length: 24)
        XCTAssertEqual(rows.count, 1)
        let packed = try model.loss(batch: rows[0])
        XCTAssertEqual(packed.count, separateCount)
        XCTAssertEqual(packed.sum, separate, accuracy: 1e-4 * separate)
        // Positions restart per example.
        XCTAssertEqual(Array(rows[0].positions.prefix(9)), (0..<9).map { Int32($0) })
        XCTAssertEqual(rows[0].positions[9], 0)
    }
}

final class TrainerTests: XCTestCase {
    /// Pre-tokenized examples for the tiny model: one of two fixed sequences, easy to learn.
    func examples(_ count: Int, seed: UInt64) -> [TokenizedExample] {
        var rng = SeededGenerator(seed: seed)
        return (0..<count).map { i in
            let start = rng.next() % 2 == 0 ? 100 : 500
            let tokens = (0..<12).map { start + ($0 % 4) * 7 }
            return TokenizedExample(tokens: tokens, labels: tokens, line: i + 1)
        }
    }

    func configuration(_ output: String) -> TrainingConfiguration {
        var c = TrainingConfiguration()
        c.model = TestFixtures.path("tiny-llama/base")
        c.datasets = ["synthetic"]
        c.outputDirectory = output
        c.loraR = 4
        c.loraAlpha = 8
        c.loraDropout = 0.1
        c.batchSize = 2
        c.gradientAccumulationSteps = 2
        c.maxSteps = 6
        c.learningRate = 5e-3
        c.warmupSteps = 1
        c.loggingSteps = 1
        c.saveSteps = 3
        c.optimizer = "paged_adamw_8bit"
        c.seed = 11
        return c
    }

    func makeTrainer(_ c: TrainingConfiguration, trainingExamples: Int = 16) throws -> Trainer {
        let model = try LlamaForwardTests.loadTinyLlama()
        let trainer = try Trainer(configuration: c, model: model, train: examples(trainingExamples, seed: 1), eval: examples(4, seed: 2),
                                  padID: 0, baseDirectory: nil)
        trainer.log = { _ in }
        trainer.showProgress = { _ in }
        return trainer
    }

    func testTrainingLowersTheLossAndWritesPEFTAdapterMetricsAndReport() throws {
        let dir = try TestFixtures.temporaryDirectory()
        var c = configuration(dir)
        c.maxSteps = 12
        c.learningRate = 1e-2
        c.optimizer = "adamw"
        let trainer = try makeTrainer(c)
        let before = try trainer.evaluate()
        let summary = try trainer.run()
        XCTAssertEqual(summary.steps, 12)
        let after = try trainer.evaluate()
        XCTAssertLessThan(after, before * 0.85, "eval loss \(before) → \(after)")
        let adapter = try SafeTensorsFile(path: dir + "/adapter_model.safetensors")
        XCTAssertNotNil(adapter.info("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"))
        XCTAssertEqual(try JSONValue.parse(bytes: try FileSystem.readFile(dir + "/adapter_config.json"))["r"], .int(4))
        let metrics = try FileSystem.readText(dir + "/metrics.jsonl").split(separator: "\n")
        XCTAssertEqual(metrics.filter { $0.contains("\"loss\"") }.count, 12)
        XCTAssertTrue(try FileSystem.readText(dir + "/report.html").contains("<polyline"))
        XCTAssertTrue(try FileSystem.readText(dir + "/report.html").contains("<td>cpu (fp32)</td>"), "the report names the device and compute type")
        // Checkpoint rotation keeps two.
        XCTAssertEqual(try Checkpoints.steps(in: dir).count, 2)
    }

    /// A run stopped at step 3 and resumed gives the same loss at every later step as the run that was never stopped.
    func testResumeIsExact() throws {
        let straightDir = try TestFixtures.temporaryDirectory("straight")
        let straight = try makeTrainer(configuration(straightDir))
        _ = try straight.run()

        let resumedDir = try TestFixtures.temporaryDirectory("resumed")
        let first = try makeTrainer(configuration(resumedDir))
        first.shouldStop = { $0 == 3 }
        _ = try first.run()
        XCTAssertEqual(first.history.count, 3)
        var c = configuration(resumedDir)
        c.resume = true
        let second = try makeTrainer(c)
        _ = try second.run()
        XCTAssertEqual(second.history.count, 6)
        for (a, b) in zip(straight.history, second.history) {
            XCTAssertEqual(a.step, b.step)
            XCTAssertEqual(a.loss, b.loss, "step \(a.step)")
            XCTAssertEqual(a.gradientNorm, b.gradientNorm, "step \(a.step)")
        }
    }

    /// With an eval loss that cannot improve (learning rate 0 after warmup 0 → no change), patience 2 stops at step 3.
    func testEarlyStoppingAfterPatienceEvaluationsWithoutImprovement() throws {
        let dir = try TestFixtures.temporaryDirectory()
        var c = configuration(dir)
        c.maxSteps = 10
        c.learningRate = 1e-30
        c.warmupSteps = 0
        c.scheduler = "constant"
        c.evalSteps = 1
        c.earlyStoppingPatience = 2
        let trainer = try makeTrainer(c)
        let summary = try trainer.run()
        XCTAssertTrue(summary.stoppedEarly)
        XCTAssertEqual(summary.steps, 3)
        XCTAssertEqual(summary.bestStep, 1)
        XCTAssertTrue(FileSystem.exists(dir + "/best/adapter_model.safetensors"))
    }

    func testYAMLConfigurationAndUnknownKeys() throws {
        let dir = try TestFixtures.temporaryDirectory()
        try FileSystem.writeAtomically(dir + "/train.yaml", text: """
        # a comment
        model: smollm2-135m
        dataset:
          - a.jsonl
          - b.jsonl
        lora_r: 8
        target_modules: [q_proj, v_proj]
        learning_rate: 1e-4   # inline comment
        lr_scheduler_type: "linear"
        packing: true
        full_determinism: true
        """)
        let c = try TrainingConfiguration(yamlFile: dir + "/train.yaml")
        XCTAssertEqual(c.datasets, ["a.jsonl", "b.jsonl"])
        XCTAssertEqual(c.loraR, 8)
        XCTAssertEqual(c.targetModules, ["q_proj", "v_proj"])
        XCTAssertEqual(c.learningRate, 1e-4)
        XCTAssertEqual(c.scheduler, "linear")
        XCTAssertTrue(c.packing)
        XCTAssertTrue(c.fullDeterminism)
        XCTAssertFalse(TrainingConfiguration().fullDeterminism)
        try FileSystem.writeAtomically(dir + "/bad.yaml", text: "learning_rat: 1e-4\n")
        XCTAssertThrowsError(try TrainingConfiguration(yamlFile: dir + "/bad.yaml")) { XCTAssertTrue("\($0)".contains("'learning_rat': unknown setting")) }
    }
}
