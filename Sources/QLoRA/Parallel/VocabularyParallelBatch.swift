// The host side of the GPU trainer's vocabulary-parallel loss (Backend/CUDA/Model/CUDADecoderTrainer+VocabularyParallelHead.swift,
// whose arithmetic is Parallel/VocabularyParallelLoss.swift's): where every rank's rows sit in the gathered buffers
// and which chunks of them the loss computes. The ranks' token counts differ from batch to batch (packing, the last
// micro-batch), so each rank's rows are padded to the largest count P, which the ranks exchange first: rank q's rows
// are gathered rows [q·P, q·P + n_q); the padding rows [q·P + n_q, (q + 1)·P) are sent but never computed.

/// One batch's layout of the gathered rows over the ranks.
public struct VocabularyParallelBatch: Equatable, Sendable {
    /// Each rank's tokens in this batch.
    public let counts: [Int]

    public init(counts: [Int]) {
        precondition(!counts.isEmpty && counts.allSatisfy { $0 >= 0 }, "one token count (at least 0) per rank")
        self.counts = counts
    }

    public var worldSize: Int { counts.count }
    /// Rows per rank in the gathered buffers: the largest count.
    public var part: Int { counts.max() ?? 0 }
    /// Gathered rows (every rank's part).
    public var rows: Int { worldSize * part }
    /// Rank q's first row in the gathered buffers.
    public func start(of rank: Int) -> Int { rank * part }

    /// A chunk of one rank's rows: its rows [local, local + rows) are gathered rows [gathered, gathered + rows).
    public struct Chunk: Equatable, Sendable {
        public var rank: Int
        public var local: Int
        public var gathered: Int
        public var rows: Int
    }

    /// Every rank's rows in chunks of at most `chunkRows`, rank by rank, each rank's from its first row (so a chunk
    /// never spans two ranks, and the rows of a world of one are chunked as the whole-vocabulary loss chunks them);
    /// padding rows are left out.
    public func chunks(chunkRows: Int) -> [Chunk] {
        precondition(chunkRows > 0, "chunks of at least one row")
        var result: [Chunk] = []
        for (rank, count) in counts.enumerated() {
            for local in stride(from: 0, to: count, by: chunkRows) {
                result.append(Chunk(rank: rank, local: local, gathered: start(of: rank) + local, rows: min(chunkRows, count - local)))
            }
        }
        return result
    }
}

extension VocabularyParallelLoss {
    /// The rank whose slice (`slice(vocab:rank:worldSize:)`) holds vocabulary row `column` (cross_entropy.cu's
    /// slice_owner).
    static func owner(of column: Int, vocab: Int, worldSize: Int) -> Int {
        precondition((0..<vocab).contains(column) && worldSize > 0, "column \(column) of a vocabulary of \(vocab)")
        let base = vocab / worldSize, extra = vocab % worldSize
        return column < extra * (base + 1) ? column / (base + 1) : extra + (column - extra * (base + 1)) / base
    }

    /// The rows of the largest slice (rank 0's): what each rank's head buffer is sized by.
    static func largestSlice(vocab: Int, worldSize: Int) -> Int { (vocab + worldSize - 1) / max(worldSize, 1) }
}
