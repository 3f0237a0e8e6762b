import ArgumentParser
import QLoRA

struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "The main job: QLoRA-tune the default model on the bundled date task and show held-out loss, exact match and answers before and after."
    )

    @Option(help: "Base model folder or known name.") var model: String = ModelCatalog.defaultModel
    @Option(help: "Folder with train.jsonl and test.jsonl (messages ending with the expected answer).") var data: String = "data/dates"
    @Option(help: "Output folder for the adapter, checkpoints, metrics.jsonl and report.html (an earlier demo run there is replaced).")
    var output: String = "runs/demo"
    @Option(parsing: .unconditional, help: "Optimizer steps.") var maxSteps: Int = 24
    @Option(parsing: .unconditional, help: "Packed rows of 512 tokens (about 9 examples each) per optimizer step.") var batchSize: Int = 2
    @Option(parsing: .unconditional, help: "Peak learning rate.") var learningRate: Double = 1e-3
    @Option(parsing: .unconditional, help: "Held-out examples to answer (0: all).") var testExamples: Int = 0
    @Option(help: "Where to train: auto (the GPU when one is usable, else the CPU), cpu or cuda.") var device: String = "auto"
    @OptionGroup var computeDTypeOption: ComputeDTypeOption

    func run() throws {
        let answerTokens = 24
        guard maxSteps > 0 else { throw ValidationError("--max-steps must be a positive integer, got \(maxSteps)") }
        guard batchSize > 0 else { throw ValidationError("--batch-size must be a positive integer, got \(batchSize)") }
        guard learningRate.isFinite && learningRate > 0 else { throw ValidationError("--learning-rate must be a positive number, got \(learningRate)") }
        guard testExamples >= 0 else { throw ValidationError("--test-examples must be a non-negative integer (0: all), got \(testExamples)") }
        let start = monotonicSeconds()
        let loaded = try ModelLoader.load(model, quantization: .nf4, log: { printError($0) })
        printError("model: \(loaded.description)")
        guard let tokenizer = loaded.tokenizer, let template = loaded.template else {
            throw ValidationError("\(loaded.directory) needs tokenizer.json and a chat template")
        }
        var c = TrainingConfiguration()
        c.model = model
        c.datasets = [data + "/train.jsonl"]
        c.evalDataset = data + "/test.jsonl"
        c.outputDirectory = output
        c.loraR = 16
        c.loraAlpha = 32
        c.loraDropout = 0
        c.batchSize = batchSize
        c.maxSteps = maxSteps
        c.learningRate = learningRate
        c.warmupSteps = 3
        c.scheduler = "cosine"
        c.optimizer = "paged_adamw_8bit"
        c.maxSeqLength = 512
        c.packing = true
        c.gradientCheckpointing = false  // the CPU has memory to spare; recomputing costs a third more time
        c.loggingSteps = 5
        c.evalSteps = maxSteps
        c.saveSteps = maxSteps
        c.overwriteOutputDirectory = true  // the demo's folder is its own: each demo replaces the last
        let formatting = SFTFormatting(completionOnly: true, maxSequenceLength: c.maxSeqLength)
        let train = try SFTDataset(path: c.datasets[0], tokenizer: tokenizer, template: template, formatting: formatting).examples
        let eval = try SFTDataset(path: c.evalDataset!, tokenizer: tokenizer, template: template, formatting: formatting).examples
        let cases = try GenerationEvaluation.cases(path: c.evalDataset!, tokenizer: tokenizer, template: template, limit: testExamples)
        let padID = tokenizer.padTokenID ?? tokenizer.eosTokenID ?? 0

        var trainingDevice = try ComputeDevice.choose(device, computeDType: try computeDTypeOption.choice())
        try loaded.model.attachLoRA(c.loraConfig.resolvingDefaultTargets(for: loaded.model), seed: c.seed)  // B = 0: still the base model
        let trainer: Trainer
        do {
            trainer = try Trainer(configuration: c, model: loaded.model, train: train, eval: eval, padID: padID, baseDirectory: loaded.directory,
                                  device: trainingDevice)
        } catch where device.lowercased() == "auto" && trainingDevice.isCUDA {
            printError("device: cpu after all (auto: \(error))")
            trainingDevice = .cpu
            trainer = try Trainer(configuration: c, model: loaded.model, train: train, eval: eval, padID: padID, baseDirectory: loaded.directory)
        }
        // Greedy answers run where training ran, through the path `qlora eval --generate` takes; on the GPU the generator
        // is made anew after training to pick up the trained adapter.
        let stopIDs = Generator.stopIDs(config: loaded.model.config, tokenizer: tokenizer)
        func exactMatch() throws -> GenerationEvaluationResult {
            try GenerationEvaluation.run(cases: cases, metrics: [.exactMatch], generator: try trainingDevice.batchGenerator(model: loaded.model),
                                         tokenizer: tokenizer, maxTokens: answerTokens, stopIDs: stopIDs)
        }
        printError("measuring the base model on \(cases.count) held-out examples...")
        let lossBefore = try trainer.evaluate()
        let before = try exactMatch()

        printError("training \(maxSteps) steps on \(train.count) examples...")
        let summary = try trainer.run()

        let lossAfter = try trainer.evaluate()
        let after = try exactMatch()
        let answerSeconds = before.seconds + after.seconds

        print("")
        print("Task: rewrite dates as ISO 8601 (\(train.count) training examples, \(cases.count) held out)")
        print("                    before      after")
        print(String(cFormat: "held-out loss      %7.4f    %7.4f", lossBefore, lossAfter))
        print(String(cFormat: "exact match        %6.1f%%    %6.1f%%", 100 * (before.value(.exactMatch) ?? 0), 100 * (after.value(.exactMatch) ?? 0)))
        print("")
        print("Some held-out answers (before → after; expected):")
        for i in 0..<min(6, cases.count) {
            print("  \(cases[i].question)")
            print("    before: \(ExactMatch.normalize(before.answers[i].text).replacing("\n", with: " ").prefix(70))")
            print("    after:  \(ExactMatch.normalize(after.answers[i].text))   (expected \(cases[i].references[0]))")
        }
        print("")
        print(String(cFormat: "%d steps at %.0f tokens/s", summary.steps, summary.tokensPerSecond) + " on the \(trainingDevice.isCUDA ? "GPU" : "CPU")"
              + String(cFormat: "; answers in %.1f s; total time %.0f s.", answerSeconds, monotonicSeconds() - start)
              + " Adapter (PEFT format): \(output); curves: \(output)/report.html")
    }
}
