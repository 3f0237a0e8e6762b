import XCTest
@testable import QLoRA

/// A NaN or infinite loss, gradient norm or adapter weight stops the run at once, naming the step and the data lines,
/// and nothing non-finite is saved: the checkpoints before it stay as they were.
final class NonFiniteTrainingTests: XCTestCase {
    func examples(_ count: Int, file: String) -> [TokenizedExample] {
        (0..<count).map { i in
            let tokens = (0..<10).map { (i % 2 == 0 ? 100 : 500) + ($0 % 4) * 7 }
            return TokenizedExample(tokens: tokens, labels: tokens, line: i + 1, file: file)
        }
    }

    /// TrainerTests' run on the tiny fixture, without dropout or warmup, evaluating and saving every 2 steps.
    func configuration(_ output: String) -> TrainingConfiguration {
        var c = TrainerTests(name: "configuration", testClosure: { _ in }).configuration(output)
        c.datasets = ["train.jsonl"]
        c.loraDropout = 0
        c.warmupSteps = 0
        c.saveSteps = 2
        c.evalSteps = 2
        c.optimizer = "adamw"
        c.seed = 5
        return c
    }

    func makeTrainer(_ c: TrainingConfiguration, model: DecoderModel? = nil) throws -> Trainer {
        let trainer = try Trainer(configuration: c, model: model ?? LlamaForwardTests.loadTinyLlama(),
                                  train: examples(8, file: "train.jsonl"), eval: examples(2, file: "eval.jsonl"), padID: 0, baseDirectory: nil)
        trainer.log = { _ in }
        trainer.showProgress = { _ in }
        return trainer
    }

    func adapterIsFinite(_ path: String) throws -> Bool {
        let file = try SafeTensorsFile(path: path)
        return try file.names.allSatisfy { try file.floats($0).allSatisfy(\.isFinite) }
    }

    /// An infinite embedding (a base weight that overflowed) after step 2: step 3's loss is NaN.
    func testANaNLossStopsTheRunNamingTheStepAndLinesAndKeepsTheLastCheckpoint() throws {
        // The run that never meets a NaN, for the bytes checkpoint-2 must still hold.
        let cleanDir = try TestFixtures.temporaryDirectory("clean")
        let cleanTrainer = try makeTrainer(configuration(cleanDir))
        cleanTrainer.shouldStop = { $0 == 2 }
        _ = try cleanTrainer.run()

        let dir = try TestFixtures.temporaryDirectory()
        let model = try LlamaForwardTests.loadTinyLlama()
        let trainer = try makeTrainer(configuration(dir), model: model)
        trainer.shouldStop = { step in
            if step == 2 { model.embedding.storage.update(repeating: .infinity) }
            return false
        }
        XCTAssertThrowsError(try trainer.run()) { error in
            guard let error = error as? NonFiniteError else { return XCTFail("\(error)") }
            XCTAssertTrue(error.message.hasPrefix("step 3: the loss is nan in micro-batch 1 of 2 (train.jsonl lines "), error.message)
            XCTAssertTrue(error.message.hasSuffix("training stopped, nothing of this step was saved and the last good checkpoint is \(dir)/checkpoint-2"),
                          error.message)
        }
        XCTAssertEqual(trainer.history.count, 2)
        XCTAssertEqual(try Checkpoints.steps(in: dir), [2])
        XCTAssertFalse(FileSystem.exists(dir + "/adapter_model.safetensors"), "no final adapter after a NaN")
        XCTAssertTrue(try adapterIsFinite(dir + "/best/adapter_model.safetensors"))
        for name in ["adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"] where FileSystem.exists(cleanDir + "/checkpoint-2/" + name) {
            XCTAssertEqual(try FileSystem.readFile(dir + "/checkpoint-2/" + name), try FileSystem.readFile(cleanDir + "/checkpoint-2/" + name), name)
        }
    }

    /// A NaN that reaches an adapter weight is never saved, as a checkpoint or as best/.
    func testANonFiniteAdapterIsNeverSaved() throws {
        let dir = try TestFixtures.temporaryDirectory()
        let model = try LlamaForwardTests.loadTinyLlama()
        var c = configuration(dir)
        c.evalSteps = 0
        c.saveSteps = 1
        let trainer = try makeTrainer(c, model: model)
        trainer.shouldStop = { step in
            if step == 2 { model.linearLayers.first { $0.lora != nil }!.lora!.b.storage[0] = .nan }
            return false
        }
        XCTAssertThrowsError(try trainer.run()) { error in
            XCTAssertTrue("\(error)".hasPrefix("step 2: the adapter weight model.layers.0."), "\(error)")
            XCTAssertTrue("\(error)".contains(".lora_B.weight is not finite; training stopped"), "\(error)")
        }
        XCTAssertEqual(try Checkpoints.steps(in: dir), [1])
        XCTAssertFalse(FileSystem.exists(dir + "/adapter_model.safetensors"))
    }

    /// An eval loss that turns NaN mid-run (a token only the eval data uses has an infinite embedding) stops the run
    /// before best/ or a checkpoint is written from it.
    func testANaNEvalLossMidRunStopsBeforeBestIsSaved() throws {
        let dir = try TestFixtures.temporaryDirectory()
        let model = try LlamaForwardTests.loadTinyLlama()
        let eval = (0..<2).map { TokenizedExample(tokens: [900, 901, 902], labels: [900, 901, 902], line: $0 + 1, file: "eval.jsonl") }
        let trainer = try Trainer(configuration: configuration(dir), model: model, train: examples(8, file: "train.jsonl"), eval: eval,
                                  padID: 0, baseDirectory: nil)
        trainer.log = { _ in }
        trainer.showProgress = { _ in }
        trainer.shouldStop = { step in
            if step == 1 { (model.embedding.pointer + 901 * model.config.hiddenSize).update(repeating: .infinity, count: model.config.hiddenSize) }
            return false
        }
        XCTAssertThrowsError(try trainer.run()) { error in
            XCTAssertTrue("\(error)".hasPrefix("step 2: after the update, evaluation: the loss of batch 1 of 1 is nan (eval.jsonl lines 1, 2); "
                                               + "training stopped"), "\(error)")
        }
        XCTAssertFalse(FileSystem.exists(dir + "/best"))
        XCTAssertEqual(try Checkpoints.steps(in: dir), [])
        XCTAssertFalse(FileSystem.exists(dir + "/adapter_model.safetensors"))
    }

    /// An evaluation whose loss is NaN is an error naming the eval lines, not a "best" eval loss.
    func testANaNEvaluationLossIsAnError() throws {
        let model = try LlamaForwardTests.loadTinyLlama()
        var batch = TrainingBatch(examples: [([1, 2, 3], [1, 2, 3])], length: 3, padID: 0)
        batch.origins = [ExampleOrigin(file: "eval.jsonl", line: 7)]
        XCTAssertEqual(try Evaluation.loss(model: model, batches: [batch]).count, 2)
        model.embedding.storage.update(repeating: .infinity)
        XCTAssertThrowsError(try Evaluation.loss(model: model, batches: [batch])) { error in
            XCTAssertEqual("\(error)", "evaluation: the loss of batch 1 of 1 is nan (eval.jsonl line 7)")
        }
    }

    /// A non-finite gradient norm applies no update: the adapter and the optimizer state stay as they were.
    func testANonFiniteGradientNormAppliesNoUpdate() throws {
        let model = try LlamaForwardTests.loadTinyLlama()
        try model.attachLoRA(LoRAConfig(rank: 4, alpha: 8, dropout: 0, targetModules: LoRAConfig.llamaProjections), seed: 1)
        let engine = CPUTrainingEngine(model: model, optimizer: try OptimizerKind.adamw.make(AdamWHyperparameters()))
        let batch = TrainingBatch(examples: [([1, 2, 3, 4], [1, 2, 3, 4])], length: 4, padID: 0)
        // One good step first, so that there is optimizer state to keep.
        _ = try engine.accumulate(batch: batch, normalizer: batch.countedTokens, options: TrainingStepOptions(), first: true)
        XCTAssertTrue(try engine.step(learningRate: 1e-2, maxGradNorm: 1).isFinite)
        for maxGradNorm in [1.0, 0] {
            _ = try engine.accumulate(batch: batch, normalizer: batch.countedTokens, options: TrainingStepOptions(), first: true)
            let before = model.linearLayers.compactMap { $0.lora.map { Array($0.a.storage) + Array($0.b.storage) } }
            let stateBefore = engine.optimizer.state().map(\.data)
            engine.gradients.a.values.first!.storage[0] = .nan
            XCTAssertTrue(try engine.step(learningRate: 1e-2, maxGradNorm: maxGradNorm).isNaN)
            XCTAssertEqual(model.linearLayers.compactMap { $0.lora.map { Array($0.a.storage) + Array($0.b.storage) } }, before)
            XCTAssertEqual(engine.optimizer.state().map(\.data), stateBefore)
        }
    }

    /// Micro-batches that count no token (all labels -100) inside a fine run give finite losses, not NaN.
    func testMicroBatchesWithoutCountedTokensStayFinite() throws {
        let dir = try TestFixtures.temporaryDirectory()
        var c = configuration(dir)
        c.batchSize = 1
        c.gradientAccumulationSteps = 1
        c.maxSteps = 8
        var train = examples(8, file: "train.jsonl")
        for i in [1, 4, 5] { train[i].labels = train[i].labels.map { _ in -100 } }
        let trainer = try Trainer(configuration: c, model: try LlamaForwardTests.loadTinyLlama(), train: train,
                                  eval: examples(2, file: "eval.jsonl"), padID: 0, baseDirectory: nil)
        trainer.log = { _ in }
        trainer.showProgress = { _ in }
        _ = try trainer.run()
        XCTAssertEqual(trainer.history.count, 8)
        XCTAssertTrue(trainer.history.allSatisfy { $0.loss.isFinite && $0.gradientNorm.isFinite }, "\(trainer.history)")
        XCTAssertTrue(trainer.history.contains { $0.loss == 0 && $0.gradientNorm == 0 }, "some step counted nothing")
        XCTAssertTrue(try adapterIsFinite(dir + "/adapter_model.safetensors"))
    }
}
