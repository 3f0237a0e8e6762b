// Loss and perplexity over a dataset, without gradients.

#if canImport(Glibc)
import Glibc
#endif

extension LossSum {
    public var perplexity: Double { exp(mean) }
}

public enum Evaluation {
    /// The mean loss over every counted token of `examples`, batched `batchSize` at a time.
    public static func loss(model: DecoderModel, examples: [TokenizedExample], batchSize: Int, padID: Int) throws -> LossSum {
        for e in examples { try e.validate(vocabularySize: model.config.vocabularySize) }
        return try loss(model: model, batches: Batching.paddedBatches(examples, size: max(1, batchSize), padID: padID))
    }

    public static func loss(model: DecoderModel, batches: [TrainingBatch]) throws -> LossSum {
        try total(batches, model.loss(batch:))
    }

    /// The summed loss of `batches` computed by a training engine (CPU or GPU).
    public static func loss(engine: TrainingEngine, batches: [TrainingBatch]) throws -> LossSum {
        try total(batches, engine.loss(batch:))
    }

    /// Refuses what the CUDA kernels are not built for (a head dimension).
    static func checkCUDASupport(_ batches: [TrainingBatch], _ config: DecoderConfig) throws {
        try config.checkCUDASupport(what: "evaluation")
    }

    /// The loss sums of every batch, added up (the mean is then over all counted tokens, as transformers computes it).
    /// A NaN or infinite batch loss is an error naming the batch's dataset lines.
    static func total(_ batches: [TrainingBatch], _ loss: (TrainingBatch) throws -> LossSum) throws -> LossSum {
        var total = LossSum(sum: 0, count: 0)
        for (b, batch) in batches.enumerated() {
            let part = try loss(batch)
            guard part.sum.isFinite else {
                throw NonFiniteError("evaluation: the loss of batch \(b + 1) of \(batches.count) is \(NonFiniteError.name(part.sum))"
                                     + (batch.origins.isEmpty ? "" : " (\(ExampleOrigin.describe(batch.origins)))"))
            }
            total.sum += part.sum
            total.count += part.count
        }
        return total
    }

    /// An engine that evaluates `model` (with its adapter, if any) on the GPU. A model without adapters gets
    /// rank-8 LoRA with B = 0 (the base model unchanged); adapter dropout is switched off (evaluation has none).
    /// The GPU holds the base in NF4 (a dense base is quantized as bitsandbytes would).
    public static func cudaEngine(context: CUDAContext, model: DecoderModel, batches: [TrainingBatch]) throws -> CUDATrainingEngine {
        try checkCUDASupport(batches, model.config)
        if model.linearLayers.allSatisfy({ $0.lora == nil }) {
            try model.attachLoRA(LoRAConfig(rank: 8, alpha: 16, dropout: 0, targetModules: LoRAConfig.llamaProjections), seed: 0)
        }
        for layer in model.linearLayers { layer.lora?.dropout = 0 }
        return try CUDATrainingEngine(context: context, model: model, capacityTokens: batches.map(\.tokenCount).max() ?? 1,
                                      optimizer: .adamw, hyperparameters: AdamWHyperparameters())
    }
}
