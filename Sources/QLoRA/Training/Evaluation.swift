// Loss and perplexity over a dataset, without gradients.

#if canImport(Glibc)
import Glibc
#endif

extension LossSum {
    public var perplexity: Double { exp(mean) }
}

public enum Evaluation {
    /// The mean loss over every counted token of `examples`, batched `batchSize` at a time.
    public static func loss(model: LlamaModel, examples: [TokenizedExample], batchSize: Int, padID: Int) throws -> LossSum {
        try loss(model: model, batches: Batching.paddedBatches(examples, size: max(1, batchSize), padID: padID))
    }

    public static func loss(model: LlamaModel, batches: [TrainingBatch]) throws -> LossSum {
        var total = LossSum(sum: 0, count: 0)
        for batch in batches {
            let part = try model.loss(batch: batch)
            total.sum += part.sum
            total.count += part.count
        }
        return total
    }
}
