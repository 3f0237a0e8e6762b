// The CUDA training engine: `CUDADecoderTrainer` (bf16 forward/backward with fp32 LoRA masters and gradients) with
// `CUDAOptimizer` over the trainer's flat LoRA buffers, so every optimizer kind (adamw, adamw_8bit and the paged
// variants) runs on the GPU with the CPU's state names: a checkpoint saved on one backend resumes on the other.
//
// LoRA dropout draws the CPU's masks (the step's dropout seed goes to the trainer), linear biases stay frozen, and
// each projection may have its own rank or no adapter at all (PEFT's target_modules naming only some projections).
// Evaluation runs the forward alone (`CUDADecoderTrainer.forwardLoss`), without dropout: no backward, and the gradients
// are not touched.

/// Training compute on one GPU.
public final class CUDATrainingEngine: TrainingEngine {
    public let context: CUDAContext
    public let model: DecoderModel
    public let trainer: CUDADecoderTrainer
    public let optimizer: CUDAOptimizer

    /// An engine for `model` (adapters attached) holding batches of up to `capacityTokens` tokens.
    /// `deterministic`: the same bits on every run (see `CUDADecoderTrainer.deterministic`).
    public init(context: CUDAContext, model: DecoderModel, capacityTokens: Int, optimizer kind: OptimizerKind,
                hyperparameters: AdamWHyperparameters, deterministic: Bool = false) throws {
        self.context = context
        self.model = model
        trainer = try CUDADecoderTrainer(context: context, model: model, capacityTokens: capacityTokens)
        trainer.deterministic = deterministic
        optimizer = try CUDAOptimizer(context: context, kind: kind, hyperparameters)
    }

    public var deviceName: String { "cuda" }
    public var optimizerKind: OptimizerKind { optimizer.kind }

    public func accumulate(batch: TrainingBatch, normalizer: Int, options: TrainingStepOptions, first: Bool) throws -> LossSum {
        try trainer.forwardBackward(batch: batch, normalizer: normalizer, accumulate: !first, dropoutSeed: options.dropoutSeed)
        return try trainer.lastLoss()
    }

    public func step(learningRate: Double, maxGradNorm: Double) throws -> Double {
        try trainer.clipGradients(maxNorm: maxGradNorm > 0 ? Float(maxGradNorm) : .infinity)
        // Read before the update (the step waited for it anyway): a NaN or infinite norm applies nothing.
        let norm = try trainer.lastGradientNorm()
        guard norm.isFinite else { return norm }
        try optimizer.step(trainer.parameterSlots(), learningRate: learningRate)
        try trainer.refreshParameterCopies()
        return norm
    }

    public func loss(batch: TrainingBatch) throws -> LossSum {
        try trainer.forwardLoss(batch: batch)
        return try trainer.lastLoss()
    }

    public func copyWeightsToModel() throws {
        let layers = Dictionary(model.linearLayers.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        for (name, a, b) in try trainer.loraParameters() {
            guard let lora = layers[name]?.lora, lora.a.count == a.count, lora.b.count == b.count else {
                throw UsageError("the GPU adapter \(name) has no CPU twin of its shape")
            }
            for i in 0..<a.count { lora.a.storage[i] = a[i] }
            for i in 0..<b.count { lora.b.storage[i] = b[i] }
        }
    }

    public func loadWeightsFromModel() throws { try trainer.setLoRAParameters(from: model) }
    public func optimizerState() throws -> [TensorRecord] { try optimizer.state() }
    public func loadOptimizerState(_ file: SafeTensorsFile) throws { try optimizer.load(state: file) }
}
