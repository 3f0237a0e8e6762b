import XCTest
@testable import QLoRA

/// The host side of the GPU trainer's vocabulary-parallel head (Backend/CUDA/Model/CUDADecoderTrainer+VocabularyParallelHead.swift),
/// checked without a GPU: the batch layout and chunks the trainer walks (Parallel/VocabularyParallelBatch.swift), the owner
/// of a vocabulary row (cross_entropy.cu's slice_owner), the three kernels' CPU twins (CPUReference: statistics of a slice,
/// their combination in rank order, the gradient of a slice) put together over 1–4 ranks against the whole
/// vocabulary's cross-entropy, and the memory plan's accounting of the slice and the exchange.
final class VocabularyParallelHeadTests: XCTestCase {
    /// Chunks cover every rank's rows once, in order, a chunk never spans two ranks or touches padding, and a world
    /// of one is chunked as the whole-vocabulary loss chunks (stride(0, n, chunk)).
    func testBatchLayoutAndChunks() {
        for counts in [[7], [1], [5, 3], [3, 5], [4, 4], [6, 0, 2], [0, 9, 9, 1], [2, 2, 2, 0]] {
            let batch = VocabularyParallelBatch(counts: counts)
            XCTAssertEqual(batch.part, counts.max())
            XCTAssertEqual(batch.rows, counts.count * counts.max()!)
            for chunkRows in [1, 2, 3, 4, 64] {
                let chunks = batch.chunks(chunkRows: chunkRows)
                for (rank, count) in counts.enumerated() {
                    let mine = chunks.filter { $0.rank == rank }
                    XCTAssertEqual(mine.map(\.local), Array(stride(from: 0, to: count, by: chunkRows)), "\(counts), \(chunkRows)")
                    XCTAssertEqual(mine.reduce(0) { $0 + $1.rows }, count)
                    for chunk in mine {
                        XCTAssertTrue(chunk.rows > 0 && chunk.rows <= chunkRows && chunk.local + chunk.rows <= count)
                        XCTAssertEqual(chunk.gathered, rank * batch.part + chunk.local)
                    }
                }
                XCTAssertEqual(chunks.map(\.rank), chunks.map(\.rank).sorted(), "rank by rank")
            }
        }
        let one = VocabularyParallelBatch(counts: [10]).chunks(chunkRows: 4)
        XCTAssertEqual(one.map(\.gathered), [0, 4, 8])
        XCTAssertEqual(one.map(\.rows), [4, 4, 2])
    }

    /// The owner of each vocabulary row is the rank whose slice holds it, for uneven slices and ranks without rows.
    func testOwnerOfAVocabularyRowIsItsSlicesRank() {
        for vocab in [1, 2, 3, 7, 37, 128, 1001] {
            for world in 1...6 {
                for rank in 0..<world {
                    for column in VocabularyParallelLoss.slice(vocab: vocab, rank: rank, worldSize: world) {
                        XCTAssertEqual(VocabularyParallelLoss.owner(of: column, vocab: vocab, worldSize: world), rank, "V \(vocab), W \(world)")
                    }
                }
                XCTAssertEqual(VocabularyParallelLoss.largestSlice(vocab: vocab, worldSize: world),
                               VocabularyParallelLoss.slice(vocab: vocab, rank: 0, worldSize: world).count)
            }
        }
    }

    /// The three kernels' twins over W slices (each rank's statistics for every row, gathered as [W][rows][3],
    /// combined, then each slice's gradient) = the whole vocabulary's loss and d logits (CPUReference.crossEntropy of
    /// the capped logits, times the cap's slope), worlds 1–4, V = 37 (uneven) and V = 3 < W = 4 (a rank without
    /// rows), with and without soft-capping, ignored rows, and the row losses of one rank's rows only.
    func testSlicesCombinedAreTheWholeVocabularysLoss() {
        var rng = SeededGenerator(seed: 13)
        func value() -> Float { Float(Int(rng.next() % 4001) - 2000) / 250 }
        for vocab in [37, 3] {
            for world in 1...4 {
                for softcap in [nil, Float(5)] {
                    let rows = 9
                    let logits = (0..<(rows * vocab)).map { _ in value() }
                    var labels = (0..<rows).map { _ in Int32(rng.next() % UInt64(vocab)) }
                    labels[2] = CPUReference.ignoreIndex
                    labels[7] = CPUReference.ignoreIndex
                    let scale: Float = 1 / 7
                    // The whole vocabulary: capped logits into the plain reference, the slope applied to its gradient.
                    let capped = logits.map { Float(CPUReference.cappedLogit(Double($0), softcap)) }
                    let (wholeLoss, wholeSoftmax) = CPUReference.crossEntropy(logits: capped, labels: labels, rows: rows, vocab: vocab, gradScale: scale)
                    let wholeGradient = (0..<(rows * vocab)).map { i -> Float in
                        wholeSoftmax[i] * (softcap.map { 1 - powf(tanhf(logits[i] / $0), 2) } ?? 1)
                    }
                    let slices = (0..<world).map { VocabularyParallelLoss.slice(vocab: vocab, rank: $0, worldSize: world) }
                    func sliceLogits(_ s: Range<Int>) -> [Float] { (0..<rows).flatMap { r in s.map { logits[r * vocab + $0] } } }
                    let statistics = slices.flatMap { s in
                        CPUReference.crossEntropySliceStatistics(logits: sliceLogits(s), labels: labels, rows: rows, width: s.count,
                                                                 columnStart: s.lowerBound, softcap: softcap)
                    }
                    let (lse, rowLoss) = CPUReference.crossEntropyCombine(statistics: statistics, labels: labels, rows: rows, worldSize: world,
                                                                          vocab: vocab, lossRows: 0..<rows)
                    let what = "V \(vocab), W \(world), cap \(softcap.map { "\($0)" } ?? "none")"
                    for r in 0..<rows { XCTAssertEqual(rowLoss[r], wholeLoss[r], accuracy: 1e-5 * max(1, abs(wholeLoss[r])), what) }
                    // One rank's rows alone (rows 3..<6): the same values there.
                    let part = CPUReference.crossEntropyCombine(statistics: statistics, labels: labels, rows: rows, worldSize: world,
                                                                vocab: vocab, lossRows: 3..<6).rowLoss
                    XCTAssertEqual(part, Array(rowLoss[3..<6]), what)
                    var gradient = [Float](repeating: .nan, count: rows * vocab)
                    for s in slices {
                        let g = CPUReference.crossEntropySliceGradient(logits: sliceLogits(s), labels: labels, lse: lse, rows: rows, width: s.count,
                                                                       columnStart: s.lowerBound, gradScale: scale, softcap: softcap)
                        for r in 0..<rows { for (j, column) in s.enumerated() { gradient[r * vocab + column] = g[r * s.count + j] } }
                    }
                    for i in 0..<(rows * vocab) { XCTAssertEqual(gradient[i], wholeGradient[i], accuracy: 1e-6, "\(what), element \(i)") }
                }
            }
        }
        // A slice without columns: (−∞, 0, 0) per row, left out of the combination.
        let empty = CPUReference.crossEntropySliceStatistics(logits: [], labels: [1, 2], rows: 2, width: 0, columnStart: 3, softcap: nil)
        XCTAssertEqual(empty, [-.infinity, 0, 0, -.infinity, 0, 0])
    }

    // MARK: The plan

    /// The head sharded by vocabulary over W ranks (`headShardedOver`): the weights hold the largest slice instead of
    /// the whole head (tied: the table, unchanged), the activations the exchange's buffers, each by hand; a world of
    /// one adds only the small buffers (norm1 holds its rows); nothing else changes.
    func testHeadShardedByVocabularyCountsTheSliceAndTheExchange() {
        let s = DeviceAllocator.sizeClass
        for arch in [Architecture.llama3_1_8b, .llama3_1_70b] {
            let c = arch.config, n = 4096, h = c.hiddenSize, v = c.vocabularySize
            let whole = CUDAMemoryPlan(config: c, tokens: n, rank: 16, dropout: true, shardedOver: 2, optimizer: .pagedAdamw8bit)
            for world in [1, 2, 3, 4] {
                let plan = whole.replanned(headShardedOver: .some(world))
                XCTAssertEqual(plan.headShardedWorld, world)
                let sliceRows = (v + world - 1) / world
                XCTAssertEqual(plan.headSlice, s(2 * sliceRows * h))
                XCTAssertEqual(whole.weights - plan.weights, s(2 * v * h) - s(2 * sliceRows * h), "\(arch) over \(world)")
                let chunk = BlockScratchLayout(config: c, tokens: n).lossChunkRows
                let norm1 = 2 * n * (h + LoRAFoldLayout.widestColumns(c, ranks: Array(repeating: Array(repeating: 16, count: 7), count: c.layerCount))[0])
                let exchange = s(max(2 * world * n * h, norm1)) - s(norm1) + s(4 * world * n) + s(4 * 3 * world * world * n) + s(4 * world * n)
                    + s(4 * chunk * h)
                XCTAssertEqual(plan.headExchange, exchange, "\(arch) over \(world)")
                XCTAssertEqual(plan.activations - whole.activations, exchange)
                XCTAssertEqual(plan.total - whole.total, exchange - (whole.weights - plan.weights))
                XCTAssertEqual(plan.adapters, whole.adapters)
                XCTAssertEqual(plan.optimizer, whole.optimizer)
                XCTAssertTrue("\(plan)".contains("head sharded by vocabulary over \(world) ranks"), "\(plan)")
                if world == 1 { XCTAssertEqual(plan.weights, whole.weights, "a world of one keeps the whole head") }
            }
        }
        // Tied embeddings: the slice is a view into the table, so only the exchange is added.
        let tied = Architecture.llama3_2_1b.config
        XCTAssertTrue(tied.tieWordEmbeddings)
        let plain = CUDAMemoryPlan(config: tied, tokens: 2048, rank: 16)
        let sharded = plain.replanned(headShardedOver: .some(2))
        XCTAssertEqual(sharded.weights, plain.weights)
        XCTAssertEqual(sharded.headSlice, 0)
        XCTAssertEqual(sharded.total - plain.total, sharded.headExchange)
    }
}
