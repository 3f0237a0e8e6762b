// What the two remaining sharding levers would take off each rank's plan: the adapters' fp32 masters and gradients
// sharded as ZeRO-2 (Parallel/ShardedAdapters.swift) and the head's loss sharded by vocabulary
// (Parallel/VocabularyParallelLoss.swift). Both run on the CPU ranks (`qlora train --world N`); the GPU trainer shards
// the adapters' optimizer state (session 10) and, since session 11, their masters and gradients and the head too, all
// counted in `total` (what the trainer allocates): `CUDAMemoryPlan(adaptersShardedOver:)`, with two buckets where this
// projection counts one, and `CUDAMemoryPlan(headShardedOver:)`. `qlora plan` prints a lever's projection only for a
// plan that does not pull it.
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
public struct ShardingProjection: Sendable, Equatable {
    public var world: Int
    /// fp32 masters + gradients of every LoRA tensor on each rank now.
    public var wholeAdapters: Int
    /// fp32 masters and gradients of this rank's tensors (the largest rank's), and the one-block gradient bucket.
    public var ownedMasters: Int
    public var ownedGradients: Int
    public var gradientBucket: Int
    /// The bf16 head now, its slice, the other ranks' normed rows, the fp32 d(hidden) chunk.
    public var wholeHead: Int
    public var headSlice: Int
    public var gatheredRows: Int
    public var hiddenGradientChunk: Int

    /// Bytes the ZeRO-2 adapters take off a rank.
    public var adapterSaving: Int { wholeAdapters - ownedMasters - ownedGradients - gradientBucket }
    /// Bytes the vocabulary-parallel head takes off a rank (0 with tied embeddings).
    public var headSaving: Int { wholeHead == 0 ? 0 : wholeHead - headSlice - gatheredRows - hiddenGradientChunk }
}

extension CUDAMemoryPlan {
    /// The projection for this plan's request over `world` ranks (at least 2).
    public func shardingProjection(world: Int) -> ShardingProjection {
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
