import XCTest
@testable import QLoRA

/// The training seam: the default trainer runs on the CPU engine (the GPU engine takes every configuration; its
/// parity with the CPU engine is qlora-gpu-check's).
final class TrainingEngineTests: XCTestCase {

    /// The configuration qlora-gpu-check runs on both engines (TrainerEngineChecks.swift) trains on the CPU engine,
    /// checkpoints the optimizer and saves a PEFT adapter with all 28 LoRA tensors.
    func testGPUCheckConfigurationRunsOnTheCPUEngine() throws {
        let model = try ModelLoader.load(TestFixtures.path("tiny-llama/base"), quantization: .nf4).model
        let peft = try PEFTAdapter.load(directory: TestFixtures.path("tiny-llama/adapter"), into: model)
        var rng = SeededGenerator(seed: 7)
        let examples = (0..<8).map { i -> TokenizedExample in
            let tokens = (0..<48).map { _ in Int(rng.next() % 1000) }
            return TokenizedExample(tokens: tokens, labels: tokens, line: i + 1)
        }
        var c = TrainingConfiguration()
        c.datasets = ["in-memory"]
        c.loraR = peft.rank
        c.loraAlpha = peft.alpha
        c.loraDropout = 0
        c.batchSize = 2
        c.gradientAccumulationSteps = 2
        c.maxSteps = 6
        c.learningRate = 2e-3
        c.warmupSteps = 1
        c.scheduler = "cosine"
        c.optimizer = "paged_adamw_8bit"
        c.maxGradNorm = 0.5
        c.packing = false
        c.maxSeqLength = 64
        c.evalSteps = 6
        c.saveSteps = 3
        c.outputDirectory = try TestFixtures.temporaryDirectory()
        let trainer = try Trainer(configuration: c, model: model, train: examples, eval: Array(examples.prefix(3)), padID: 0,
                                  baseDirectory: nil, device: .cpu)
        trainer.log = { _ in }
        trainer.showProgress = { _ in }
        XCTAssertTrue(trainer.engine is CPUTrainingEngine)
        let summary = try trainer.run()
        XCTAssertEqual(summary.steps, 6)
        XCTAssertNotNil(summary.bestEvalLoss)
        let adapter = try SafeTensorsFile(path: c.outputDirectory + "/adapter_model.safetensors")
        XCTAssertEqual(adapter.tensors.count, 28)
        XCTAssertTrue(FileSystem.exists(c.outputDirectory + "/checkpoint-3/optimizer.safetensors"))
    }
}
