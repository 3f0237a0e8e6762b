// The GPU trainer's head sharded by vocabulary over NCCL ranks (`--shard-head`; the CPU ranks' contract and arithmetic:
// Parallel/VocabularyParallelLoss.swift; the kernels: Kernels/cross_entropy.cu's second part). Rank r of W keeps only
// rows [v_r, v_{r+1}) of lm_head in bf16 (`VocabularyParallelLoss.slice`: contiguous, the first V mod W ranks one row
// longer; a rank may have none when V < W) and computes their logits for every rank's tokens. One micro-batch:
//   0. (at the start of the step's work, while NCCL's stream is idle) the ranks' token counts, all-gathered on the
//      host: the batch's layout (Parallel/VocabularyParallelBatch.swift): rank q's rows are gathered rows
//      [q·P, q·P + n_q), P the largest count; the padding rows are sent but never computed;
//   1. the final norm writes this rank's normed rows into its part of `rows` [W·N, H] and its targets are copied into
//      its part of `targets`; both all-gathered in place (NCCL's stream, ordered by events both ways);
//   2. statistics, a chunk of rows at a time (the chunks of the whole-vocabulary loss, rank by rank): logits of the
//      slice [rows, w_r] = rows·slice_headᵀ (bf16, the plain path's GEMM), then per row (m, s, t)
//      (cross_entropy_slice_statistics: the plain kernel's merge order); all ranks' statistics all-gathered in place,
//      combined in rank order into lse and this rank's row losses (cross_entropy_combine);
//   3. (training) the gradient pass, chunk by chunk: the slice's logits again, d logits given lse in place
//      (cross_entropy_slice_gradient), the chunk's d(normed) partial product d logits·slice_head in fp32 reduced to the
//      chunk's owner (ncclReduce in place), which rounds it into its rows of dNorm; the rest of the backward unchanged.
// Evaluation (`forwardLoss`) makes 0–2 without the gradient pass; every rank makes every forward together (the Trainer
// pads a rank a batch short with one more forward whose loss it drops).
// A world of one is the plain path bit for bit: the same GEMMs on the same rows (norm1 is the start of `rows`), the
// statistics pass keeps the plain kernel's merge order, the combination of one rank is M = m, S = 0 + s·e⁰ = s, and
// lse = M + log S the plain kernel's formula; and d(normed) is written by the bf16 GEMM as the plain path writes it
// (`reduceInFloat` off), since an fp32 GEMM rounded to bf16 is the bf16 GEMM's bits only if cuBLASLt picks an
// algorithm with the same accumulation order for both output types. With several ranks the partial products must be
// summed before rounding, so they are reduced in fp32; the differences from the unsharded run are then the two W-way
// sums (S and d(normed)), each within fp32 summation order.
// Memory per rank (counted by CUDAMemoryPlan through `VocabularyParallelHeadLayout`): the head's slice instead of the
// whole head (with tied embeddings the slice is a view into the embedding table, which stays whole), `rows` of
// W·N·H bf16 of which norm1 (N·(H + fold) values) is the start, so (W − 1)·N·H more; the gathered targets, the
// statistics [W][W·N][3], lse [W·N], and one chunk of fp32 d(normed) [lossChunkRows, H].

/// Element counts of the vocabulary-parallel head's buffers for `tokens` per rank over `worldSize` ranks, which the
/// trainer allocates and the memory plan counts.
struct VocabularyParallelHeadLayout: Equatable {
    /// bf16 values of the largest rank's head slice (rank 0's).
    var headSlice: Int
    /// bf16 values of the gathered normed rows (norm1 of `normColumns` values a row is a view into their start).
    var rows: Int
    /// Int32 targets, fp32 lse (one per gathered row each), fp32 statistics (three per gathered row from each rank).
    var targets: Int
    var lse: Int
    var statistics: Int
    /// fp32 values of one chunk of d(normed).
    var hiddenGradient: Int

    init(config c: DecoderConfig, tokens n: Int, worldSize world: Int, normColumns: Int) {
        let h = c.hiddenSize
        headSlice = VocabularyParallelLoss.largestSlice(vocab: c.vocabularySize, worldSize: world) * h
        rows = max(world * n * h, n * normColumns)
        targets = world * n
        lse = world * n
        statistics = 3 * world * world * n
        hiddenGradient = BlockScratchLayout(config: c, tokens: n).lossChunkRows * h
    }
}

/// One rank's vocabulary-parallel head: its slice of the vocabulary and the buffers of the exchange (the header).
final class CUDAVocabularyParallelHead {
    let collective: NCCLCollective
    /// This rank's vocabulary rows: the trainer's `head` holds their rows of lm_head.
    let columns: Range<Int>
    /// The gathered normed rows [W·N, H] (the trainer's norm1 is a view into their start).
    let rows: DeviceBuffer<UInt16>
    /// The gathered targets [W·N], the statistics [W][W·N][3] (this rank's part written, then gathered in place), lse [W·N].
    let targets: DeviceBuffer<Int32>
    let statistics: DeviceBuffer<Float>
    let lse: DeviceBuffer<Float>
    /// One chunk's fp32 d(normed) partial products [lossChunkRows, H], reduced to the chunk's owner.
    let hiddenGradient: DeviceBuffer<Float>
    /// Whether d(normed) goes through `hiddenGradient` in fp32 and ncclReduce (always with several ranks). Off in a
    /// world of one, where the slice's GEMM writes bf16 as the plain path's does (the header); the GPU check turns it
    /// on to run the several-rank path on one GPU.
    var reduceInFloat: Bool {
        didSet { precondition(reduceInFloat || collective.worldSize == 1, "several ranks reduce d(normed) in fp32") }
    }

    init(collective: NCCLCollective, vocab: Int, rows: DeviceBuffer<UInt16>, layout: VocabularyParallelHeadLayout, allocator a: DeviceAllocator) throws {
        self.collective = collective
        columns = VocabularyParallelLoss.slice(vocab: vocab, rank: collective.rank, worldSize: collective.worldSize)
        self.rows = rows
        targets = try a.buffer(Int32.self, count: layout.targets)
        statistics = try a.buffer(Float.self, count: layout.statistics)
        lse = try a.buffer(Float.self, count: layout.lse)
        hiddenGradient = try a.buffer(Float.self, count: layout.hiddenGradient)
        reduceInFloat = collective.worldSize > 1
    }

    /// Every rank's token count of this micro-batch (a host all-gather; every rank calls it together).
    func exchangeCounts(_ tokens: Int) throws -> VocabularyParallelBatch {
        let world = collective.worldSize
        var counts = [Int32](repeating: 0, count: world)
        let mine = [Int32(tokens)]
        try mine.withUnsafeBytes { shard in try counts.withUnsafeMutableBytes { try collective.allGather(shard, into: $0) } }
        let batch = VocabularyParallelBatch(counts: counts.map(Int.init))
        guard batch.part <= targets.count / world else {
            throw UsageError("a rank's micro-batch of \(batch.part) tokens exceeds the trainer's capacity of \(targets.count / world) "
                             + "(every rank's trainer is made for the same capacity)")
        }
        return batch
    }
}

extension CUDADecoderTrainer {
    /// With the head sharded by vocabulary: this rank's vocabulary rows, whose rows of lm_head it holds (nil: the
    /// whole head).
    public var headColumns: Range<Int>? { vocabularyParallel?.columns }

    /// With the head sharded by vocabulary: whether d(normed) is reduced in fp32 (always with several ranks; in a
    /// world of one the GPU check turns it on to run that path on one GPU).
    public var reducesHeadGradientInFloat: Bool {
        get { vocabularyParallel?.reduceInFloat ?? false }
        set { vocabularyParallel?.reduceInFloat = newValue }
    }

    /// The loss of x_L (`last`, this rank's n tokens) through the vocabulary-parallel head (the header, steps 1–3):
    /// this rank's row losses into rowLoss[0..<n]; with `gradientScale` (d loss sum/d row loss), d(normed) of its rows
    /// into dNorm. `batch`: the micro-batch's layout from `exchangeCounts`. Every rank calls it together.
    func vocabularyParallelLoss(_ sharded: CUDAVocabularyParallelHead, batch: VocabularyParallelBatch, last: DeviceBuffer<UInt16>,
                                gradientScale: Float?) throws {
        let c = config, ctx = context, h = c.hiddenSize
        let rank = sharded.collective.rank, world = sharded.collective.worldSize
        let n = batch.counts[rank], part = batch.part, total = batch.rows, mine = batch.start(of: rank)
        let width = sharded.columns.count, columnStart = sharded.columns.lowerBound
        guard total > 0 else { return }

        // 1. This rank's normed rows and targets into its part, then every rank's gathered in place.
        if n > 0 {
            try norm(last, finalNorm, into: sharded.rows.view(at: mine * h, count: n * h), rows: n, dim: h)
            try ctx.device.copy(deviceTo: sharded.targets.address(at: mine), from: targets.pointer, bytes: 4 * n)
        }
        try sharded.collective.afterMainStream { nccl in
            try nccl.allGatherDevice(sharded.rows.address(at: mine * h), into: sharded.rows.pointer, bytes: 2 * part * h)
            try nccl.allGatherDevice(sharded.targets.address(at: mine), into: sharded.targets.pointer, bytes: 4 * part)
        }

        // 2. This slice's statistics for every rank's rows, gathered, combined into lse and this rank's row losses.
        let blas = try ctx.blas()
        let chunks = batch.chunks(chunkRows: lossChunkRows)
        /// The logits of a chunk over this slice, into `logits` (the plain path's GEMM on the same rows at W = 1).
        func sliceLogits(_ chunk: VocabularyParallelBatch.Chunk) throws {
            try blas.gemm(m: chunk.rows, n: width, k: h, a: sharded.rows.address(at: chunk.gathered * h), b: head.pointer, transB: true,
                          c: logits.pointer)
        }
        let ownStatistics = rank * 3 * total
        for chunk in chunks {
            try sliceLogits(chunk)  // nothing for a slice without rows: its statistics are (−∞, 0, 0)
            try ctx.crossEntropySliceStatistics(logits: logits.pointer, labels: sharded.targets.address(at: chunk.gathered), rows: chunk.rows,
                                                width: width, columnStart: columnStart, softcap: c.finalLogitSoftcap,
                                                statistics: sharded.statistics.address(at: ownStatistics + 3 * chunk.gathered))
        }
        try sharded.collective.afterMainStream { nccl in
            try nccl.allGatherDevice(sharded.statistics.address(at: ownStatistics), into: sharded.statistics.pointer, bytes: 4 * 3 * total)
        }
        try ctx.crossEntropyCombine(statistics: sharded.statistics.pointer, labels: sharded.targets.pointer, rows: total, worldSize: world,
                                    vocab: c.vocabularySize, lse: sharded.lse.pointer, rowLoss: rowLoss.pointer, lossRows: mine..<(mine + n))
        guard let gradientScale else { return }

        // 3. d logits of this slice for every rank's rows, and d(normed) to each chunk's owner.
        for chunk in chunks {
            let values = chunk.rows * h
            if width > 0 {
                try sliceLogits(chunk)
                try ctx.crossEntropySliceGradient(logits: logits.pointer, labels: sharded.targets.address(at: chunk.gathered),
                                                  lse: sharded.lse.address(at: chunk.gathered), rows: chunk.rows, width: width,
                                                  columnStart: columnStart, gradScale: gradientScale, softcap: c.finalLogitSoftcap)
            }
            guard sharded.reduceInFloat else {
                // A world of one: d(normed) in bf16 from the GEMM, as the plain path writes it.
                try blas.gemm(m: chunk.rows, n: h, k: width, a: logits.pointer, b: head.pointer, c: dNorm.address(at: chunk.local * h))
                continue
            }
            if width > 0 {
                try blas.gemm(m: chunk.rows, n: h, k: width, a: logits.pointer, b: head.pointer, c: sharded.hiddenGradient.pointer,
                              outputType: .float32)
            } else {
                try ctx.device.memset(sharded.hiddenGradient.pointer, value: 0, bytes: 4 * values)
            }
            try sharded.collective.afterMainStream { try $0.reduceDevice(sharded.hiddenGradient.pointer, count: values, root: chunk.rank) }
            if chunk.rank == rank {
                try ctx.convertToBF16(sharded.hiddenGradient, into: dNorm.view(at: chunk.local * h, count: values), count: values)
            }
        }
    }
}
