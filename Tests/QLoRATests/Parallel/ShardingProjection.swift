@testable import QLoRA

// An independent count of what the two sharding levers take off each rank (the adapters' fp32 masters and gradients
// as ZeRO-2, Parallel/ShardedAdapters.swift; the head's loss by vocabulary, Parallel/VocabularyParallelLoss.swift),
// by the CPU ranks' layout: the tests hold CUDAMemoryPlan(adaptersShardedOver:headShardedOver:), which counts what the
// GPU trainer allocates for both since session 11, to it. (Until then `qlora plan` printed it as the savings still to
// come; the GPU plan's adapters have two buckets where this counts one.)
//
// Per rank of W, with P the LoRA elements (every A and B on 128 elements, the trainer's flat layout), Q the largest
// rank's owned elements (AdapterOwnership over those tensors), B the largest block's LoRA elements:
//   adapters  whole: fp32 masters P + fp32 gradients P;  ZeRO-2: masters Q + gradients Q + one block's gradient
//             bucket B (the backward writes each block's LoRA gradients into it; it is reduced to the owners and
//             reused). The bf16 copies the forward reads stay whole (all-gathered after each step).
//   head      whole: the bf16 head [V, H];  by vocabulary: its slice [⌈V/W⌉, H], the other ranks' normed rows
//             [(W−1)·N, H] in bf16 (the logits of this slice are computed for every rank's tokens), and one chunk of
//             fp32 d(hidden) partial products [lossChunkRows, H], reduced to the rows' owner a chunk at a time.
//             With tied embeddings the table stays whole for the embedding, so nothing is saved.

/// Device bytes per rank that sharding the adapters and the head would save, and the buffers they would add.
struct ShardingProjection: Sendable, Equatable {
    var world: Int
    /// fp32 masters + gradients of every LoRA tensor on each rank now.
    var wholeAdapters: Int
    /// fp32 masters and gradients of this rank's tensors (the largest rank's), and the one-block gradient bucket.
    var ownedMasters: Int
    var ownedGradients: Int
    var gradientBucket: Int
    /// The bf16 head now, its slice, the other ranks' normed rows, the fp32 d(hidden) chunk.
    var wholeHead: Int
    var headSlice: Int
    var gatheredRows: Int
    var hiddenGradientChunk: Int

    /// Bytes the ZeRO-2 adapters take off a rank.
    var adapterSaving: Int { wholeAdapters - ownedMasters - ownedGradients - gradientBucket }
    /// Bytes the vocabulary-parallel head takes off a rank (0 with tied embeddings).
    var headSaving: Int { wholeHead == 0 ? 0 : wholeHead - headSlice - gatheredRows - hiddenGradientChunk }
}

extension CUDAMemoryPlan {
    /// The projection for this plan's request over `world` ranks (at least 2).
    func shardingProjection(world: Int) -> ShardingProjection {
        let r = request, c = r.config
        let s = DeviceAllocator.sizeClass
        let shapes = Self.linearShapes(c)
        var tensors: [Int] = []
        var largestBlock = 0
        for layer in r.ranks {
            var block = 0
            for (j, rank) in layer.enumerated() where j < shapes.count && rank > 0 {
                let a = (rank * shapes[j].in + 127) / 128 * 128, b = (shapes[j].out * rank + 127) / 128 * 128
                tensors += [a, b]
                block += a + b
            }
            largestBlock = max(largestBlock, block)
        }
        let total = tensors.reduce(0, +)
        let ownership = AdapterOwnership(counts: tensors, worldSize: max(world, 1))
        let n = r.tokens, h = c.hiddenSize, v = c.vocabularySize
        let chunkRows = BlockScratchLayout(config: c, tokens: n).lossChunkRows
        let untied = !c.tieWordEmbeddings
        let sliceRows = (v + world - 1) / max(world, 1)
        return ShardingProjection(world: world, wholeAdapters: 2 * s(4 * total), ownedMasters: s(4 * ownership.partCount),
                                  ownedGradients: s(4 * ownership.partCount), gradientBucket: s(4 * largestBlock),
                                  wholeHead: untied ? s(2 * v * h) : 0, headSlice: untied ? s(2 * sliceRows * h) : 0,
                                  gatheredRows: untied ? s(2 * (world - 1) * n * h) : 0,
                                  hiddenGradientChunk: untied ? s(4 * chunkRows * h) : 0)
    }
}
