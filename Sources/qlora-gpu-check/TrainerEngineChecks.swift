// The real `Trainer` on both engines: the same run (tiny-llama fixture in NF4, the fixture's adapter as the
// initial adapter, random token rows, gradient accumulation, clipping, cosine schedule, evaluation, checkpoints)
// once with the CPU engine and once with the CUDA engine, for a plain and a paged 8-bit optimizer, and with LoRA
// dropout 0.05 (the `qlora train` default; both engines draw the same masks from the step's dropout seed).
// Per-step losses and the eval loss are held to 5e-2 relative (the GPU computes in bf16, the CPU in fp32; the
// weights drift apart a little each step). The adapter saved from the GPU run must have the CPU run's PEFT keys
// and shapes, and its values must be close to the CPU run's (relative L2 over all LoRA weights, 5e-2).
// Last, a checkpoint the CPU engine wrote (with paged 8-bit optimizer state) resumes on the GPU engine.
// fp16 only (--compute-dtype fp16): a run whose first loss scale (2^40) overflows fp16 in the backward recovers
// through the loss scaler: the first steps are skipped (each halves the scale, torch's GradScaler rule), later ones
// update; the skipped steps are the ones with a non-finite gradient norm, metrics.jsonl counts them, the final
// scale is 2^40 / 2^skipped, and the adapter ends finite and trained.

import QLoRA
#if canImport(Glibc)
import Glibc
#endif

/// Random rows of `length` tokens below `vocab`, every token counted.
func randomExamples(count: Int, length: Int, vocab: Int, seed: UInt64) -> [TokenizedExample] {
    var rng = SeededGenerator(seed: seed)
    return (0..<count).map { i in
        let tokens = (0..<length).map { _ in Int(rng.next() % UInt64(vocab)) }
        return TokenizedExample(tokens: tokens, labels: tokens, line: i + 1)
    }
}

func runTrainerEngineChecks(_ ctx: CUDAContext) {
    let directory = fixtureDirectory()
    for (optimizer, dropout) in [("adamw", 0), ("paged_adamw_8bit", 0), ("adamw", 0.05)] as [(String, Float)] {
        let label = optimizer + (dropout > 0 ? ", dropout \(dropout)" : "")
        group("training: Trainer with CPU and CUDA engines (\(label))") {
            let train = randomExamples(count: 8, length: 48, vocab: 1000, seed: 7)
            let eval = randomExamples(count: 3, length: 40, vocab: 1000, seed: 8)
            var histories: [[StepRecord]] = []
            var evalLosses: [Double] = []
            var adapters: [SafeTensorsFile] = []
            for (label, device) in [("cpu", ComputeDevice.cpu), ("cuda", ComputeDevice.cuda(ctx))] {  // shadows the group label
                let output = "/tmp/qlora-gpu-check-trainer-\(optimizer)-\(dropout)-\(label)-\(getpid())"
                let trainer = try fixtureTrainer(directory, optimizer: optimizer, device: device, output: output, train: train, eval: eval,
                                                 dropout: dropout)
                let summary = try trainer.run()
                histories.append(trainer.history)
                evalLosses.append(summary.bestEvalLoss ?? .nan)
                adapters.append(try SafeTensorsFile(path: output + "/adapter_model.safetensors"))
            }
            let (cpu, gpu) = (histories[0], histories[1])
            checkTrue("both runs took 6 steps", cpu.count == 6 && gpu.count == 6, "CPU \(cpu.count), GPU \(gpu.count)")
            for (a, b) in zip(cpu, gpu) {
                check("step \(a.step) loss (CPU \(fmt(a.loss, 5)), GPU \(fmt(b.loss, 5)))", abs(b.loss - a.loss) / abs(a.loss), 5e-2,
                      "grad norm CPU \(fmt(a.gradientNorm, 4)) GPU \(fmt(b.gradientNorm, 4))")
            }
            check("eval loss (CPU \(fmt(evalLosses[0], 5)), GPU \(fmt(evalLosses[1], 5)))",
                  abs(evalLosses[1] - evalLosses[0]) / abs(evalLosses[0]), 5e-2)
            let cpuKeys = adapters[0].tensors.map { "\($0.name) \($0.shape)" }.sorted()
            let gpuKeys = adapters[1].tensors.map { "\($0.name) \($0.shape)" }.sorted()
            checkTrue("GPU adapter has the PEFT keys and shapes", cpuKeys == gpuKeys && !gpuKeys.isEmpty,
                      "\(gpuKeys.count) tensors, e.g. \(gpuKeys.first ?? "none")")
            var cpuValues: [Float] = [], gpuValues: [Float] = []
            for info in adapters[0].tensors.sorted(by: { $0.name < $1.name }) {
                cpuValues += try adapters[0].floats(info.name)
                gpuValues += try adapters[1].floats(info.name)
            }
            check("GPU-trained adapter weights vs CPU", relativeError(gpuValues, cpuValues), 5e-2)
        }
    }

    // `full_determinism`: two GPU runs of the same Trainer configuration (8-bit paged AdamW, dropout 0.05, clipping)
    // give the same bits: every step's loss and gradient norm, the eval loss and the saved adapter file.
    group("training: full determinism on the CUDA engine") {
        let train = randomExamples(count: 8, length: 48, vocab: 1000, seed: 7)
        let eval = randomExamples(count: 3, length: 40, vocab: 1000, seed: 8)
        var histories: [[StepRecord]] = [], evalLosses: [Double] = [], adapters: [[UInt8]] = []
        for run in 0..<2 {
            let output = "/tmp/qlora-gpu-check-deterministic-\(run)-\(getpid())"
            let trainer = try fixtureTrainer(directory, optimizer: "paged_adamw_8bit", device: .cuda(ctx), output: output,
                                             train: train, eval: eval, dropout: 0.05, fullDeterminism: true)
            let summary = try trainer.run()
            histories.append(trainer.history)
            evalLosses.append(summary.bestEvalLoss ?? .nan)
            adapters.append(try FileSystem.readFile(output + "/adapter_model.safetensors"))
        }
        let differing = zip(histories[0], histories[1]).filter {
            $0.loss.bitPattern != $1.loss.bitPattern || $0.gradientNorm.bitPattern != $1.gradientNorm.bitPattern
        }.count
        checkTrue("full determinism: the same step losses and gradient norms", differing == 0 && histories[0].count == 6,
                  "\(differing) of \(histories[0].count) steps differ")
        checkTrue("full determinism: the same eval loss", evalLosses[0].bitPattern == evalLosses[1].bitPattern,
                  "\(evalLosses[0]) and \(evalLosses[1])")
        checkTrue("full determinism: the same adapter bytes", adapters[0] == adapters[1] && !adapters[0].isEmpty,
                  "\(adapters[0].count) bytes")
    }

    // A checkpoint written by the CPU engine (adapter + 8-bit optimizer state + trainer state) resumes on the GPU:
    // steps 4-6 after resuming on the GPU follow the straight CPU run's steps 4-6.
    group("training: CPU checkpoint resumes on the CUDA engine") {
        let train = randomExamples(count: 8, length: 48, vocab: 1000, seed: 7)
        let eval = randomExamples(count: 3, length: 40, vocab: 1000, seed: 8)
        let base = "/tmp/qlora-gpu-check-resume-\(getpid())"
        let straight = try fixtureTrainer(directory, optimizer: "paged_adamw_8bit", device: .cpu, output: base + "-straight",
                                          train: train, eval: eval)
        _ = try straight.run()
        let first = try fixtureTrainer(directory, optimizer: "paged_adamw_8bit", device: .cpu, output: base + "-resumed",
                                       train: train, eval: eval)
        first.shouldStop = { $0 == 3 }
        _ = try first.run()
        let second = try fixtureTrainer(directory, optimizer: "paged_adamw_8bit", device: .cuda(ctx), output: base + "-resumed",
                                        train: train, eval: eval, resume: true)
        _ = try second.run()
        checkTrue("resumed run ends at step 6", second.history.count == 6, "\(second.history.count) steps in its history")
        for (a, b) in zip(straight.history, second.history).dropFirst(3) {
            check("resumed step \(a.step) loss (CPU \(fmt(a.loss, 5)), GPU \(fmt(b.loss, 5)))", abs(b.loss - a.loss) / abs(a.loss), 5e-2)
        }
    }

    if dt == .fp16 {
        group("fp16: an overflowing loss scale recovers") {
            let train = randomExamples(count: 8, length: 48, vocab: 1000, seed: 7)
            let output = "/tmp/qlora-gpu-check-loss-scale-\(getpid())"
            let initial: Float = 0x1p40
            setenv("QLORA_INITIAL_LOSS_SCALE", "\(initial)", 1)
            defer { unsetenv("QLORA_INITIAL_LOSS_SCALE") }
            let trainer = try fixtureTrainer(directory, optimizer: "adamw", device: .cuda(ctx), output: output, train: train, eval: [],
                                             steps: 40)  // no evaluation: the adapter at the end is the last one
            let initialAdapter = trainer.model.linearLayers.compactMap { $0.lora }.flatMap { Array($0.a.storage) + Array($0.b.storage) }
            let summary = try trainer.run()
            let scaler = try XUnwrap(trainer.engine.lossScaler, "the fp16 engine has a loss scaler")
            let skippedByNorm = trainer.history.filter { !$0.gradientNorm.isFinite }.count
            checkTrue("fp16: overflowing steps were skipped", scaler.skippedSteps > 0 && scaler.skippedSteps < trainer.history.count,
                      "\(scaler.skippedSteps) of \(trainer.history.count) steps skipped, loss scale now \(scaler.scale)")
            checkTrue("fp16: skipped steps are those with a non-finite norm", skippedByNorm == scaler.skippedSteps,
                      "\(skippedByNorm) non-finite norms")
            checkTrue("fp16: scale halved per skip (torch's rule)", scaler.scale == initial / Float(1 << scaler.skippedSteps),
                      "2^40 / 2^\(scaler.skippedSteps) = \(initial / Float(1 << scaler.skippedSteps)), scale \(scaler.scale)")
            let metrics = try FileSystem.readText(output + "/metrics.jsonl").split(separator: "\n")
            let lastStepLine = try metrics.last { $0.contains("\"skipped_steps\"") }.map { try JSONValue.parse(String($0)) }
            checkTrue("fp16: metrics.jsonl counts the skipped steps", lastStepLine?["skipped_steps"]?.int == scaler.skippedSteps,
                      "last line: \(lastStepLine?.serialized() ?? "none")")
            let trained = trainer.model.linearLayers.compactMap { $0.lora }.flatMap { Array($0.a.storage) + Array($0.b.storage) }
            checkTrue("fp16: adapter finite and trained after recovery", trained.allSatisfy(\.isFinite) && trained != initialAdapter
                      && (summary.finalTrainLoss ?? .nan).isFinite, "final loss \(fmt(summary.finalTrainLoss ?? .nan, 5))")
        }
    }

    // The task metrics during training generate with the engine's generator: it must share the trainer's NF4 base
    // (one copy on the card) and answer exactly as a generator that uploads its own copy.
    group("training: the engine's generator shares the trainer's NF4 base") {
        let model = try loadFixtureModel(directory, quantization: .nf4)
        let engine = try Evaluation.cudaEngine(context: ctx, model: model, batches: [try fixtureBatch(directory)])
        let baseBytes = engine.trainer.frozenWeights.values.reduce(0) { $0 + $1.bytesRead }
        let allocator = ctx.allocator
        let before = allocator.reservedBytes
        let shared = try engine.batchGenerator(model: model)
        let sharedBytes = allocator.reservedBytes - before
        let fresh = try CUDABatchedGenerator(context: ctx, model: model)
        let freshBytes = allocator.reservedBytes - before - sharedBytes
        checkTrue("the shared generator allocates at least the base's NF4 bytes less than an uploading one",
                  freshBytes - sharedBytes >= baseBytes * 9 / 10,
                  "shared \(sharedBytes) B, uploading \(freshBytes) B, NF4 base \(baseBytes) B")
        var rng = SeededGenerator(seed: 21)
        let requests = (0..<3).map { _ in
            GenerationRequest(prompt: (0..<9).map { _ in Int(rng.next() % UInt64(model.config.vocabularySize)) }, sampling: SamplingOptions())
        }
        let a = try shared.generate(requests, maxTokens: 12, stopIDs: [])
        let b = try fresh.generate(requests, maxTokens: 12, stopIDs: [])
        checkTrue("shared and uploading generators give the same greedy tokens", a == b,
                  "\(a.map(\.tokens)) vs \(b.map(\.tokens))")
    }
}

struct MissingValue: Error, CustomStringConvertible { let description: String }
func XUnwrap<T>(_ value: T?, _ what: String) throws -> T {
    guard let value else { throw MissingValue(description: "missing: \(what)") }
    return value
}

/// A Trainer on the fixture (NF4 base, the fixture adapter as the initial adapter, with LoRA dropout `dropout`) for
/// 6 steps (`steps`) of 2 micro-batches (`accumulation`) of 2 rows, with evaluation at the end and checkpoints every 3
/// steps.
func fixtureTrainer(_ directory: String, optimizer: String, device: ComputeDevice, output: String, train: [TokenizedExample],
                    eval: [TokenizedExample], resume: Bool = false, dropout: Float = 0, fullDeterminism: Bool = false,
                    steps: Int = 6, collective: Collective = LocalCollective(), shardBase: Bool = false,
                    shardAdapters: Bool? = nil, shardHead: Bool? = nil, accumulation: Int = 2) throws -> Trainer {
    let model = try ModelLoader.load(directory + "/base", quantization: .nf4).model
    let peft = try PEFTAdapter.load(directory: directory + "/adapter", into: model)
    for layer in model.linearLayers { layer.lora?.dropout = dropout }
    var c = TrainingConfiguration()
    c.datasets = ["in-memory"]  // the examples are given directly; validation wants a name
    c.loraR = peft.rank
    c.loraAlpha = peft.alpha
    c.loraDropout = Double(dropout)
    c.batchSize = 2
    c.gradientAccumulationSteps = accumulation
    c.maxSteps = steps
    c.learningRate = 2e-3
    c.warmupSteps = 1
    c.scheduler = "cosine"
    c.optimizer = optimizer
    c.maxGradNorm = 0.5
    c.packing = false
    c.maxSeqLength = 64
    c.evalSteps = 6
    c.saveSteps = 3
    c.loggingSteps = 1
    c.outputDirectory = output
    c.resume = resume
    c.fullDeterminism = fullDeterminism
    c.shardBase = shardBase
    c.shardAdapters = shardAdapters
    c.shardHead = shardHead
    let trainer = try Trainer(configuration: c, model: model, train: train, eval: eval, padID: 0, baseDirectory: nil, device: device,
                              collective: collective)
    trainer.log = { _ in }
    trainer.showProgress = { _ in }
    return trainer
}
