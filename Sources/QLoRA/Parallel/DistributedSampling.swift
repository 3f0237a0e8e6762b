// Which items (micro-batches) each rank takes, as torch's `DistributedSampler` (drop_last=False) shards a dataset:
//
//   num_samples = ceil(N / W)           items per rank
//   total_size  = num_samples · W       the order padded by repeating its start (again and again when N < W)
//   rank r takes order[r], order[r + W], order[r + 2W], ...
//
// The order is shuffled (seeded by the epoch) before it is padded and sharded, as the sampler does with shuffle=True;
// ours is the trainer's own epoch shuffle (`Trainer.epochOrder`), so that one process with accumulation A·W takes at
// step s exactly the micro-batches order[s·A·W ..< (s+1)·A·W] that W ranks with accumulation A take together:
// rank r's i-th item sits at position r + i·W of the padded order, so its items s·A ..< (s+1)·A are the positions
// s·A·W + m·W + r, m < A: each position of the step once, over all ranks.
// Tests/QLoRATests/Parallel checks the indices against the sampler's own (Tests/Fixtures/distributed-sampler).

public enum DistributedSampling {
    /// Items per rank: ceil(count / worldSize) (at least one item of a non-empty order).
    public static func itemsPerRank(count: Int, worldSize: Int) -> Int {
        precondition(worldSize >= 1)
        return (count + worldSize - 1) / worldSize
    }

    /// `order` padded to a multiple of `worldSize` by repeating its start.
    public static func padded(_ order: [Int], worldSize: Int) -> [Int] {
        guard !order.isEmpty else { return [] }
        let total = itemsPerRank(count: order.count, worldSize: worldSize) * worldSize
        var result = order
        while result.count < total { result += order.prefix(total - result.count) }
        return result
    }

    /// The items of `rank`: positions rank, rank + W, ... of the padded order.
    public static func shard(_ order: [Int], rank: Int, worldSize: Int) -> [Int] {
        precondition((0..<worldSize).contains(rank))
        let all = padded(order, worldSize: worldSize)
        return Array(stride(from: rank, to: all.count, by: worldSize).map { all[$0] })
    }

    /// The items of `rank` without padding (evaluation: each item counted once over the ranks, so the reduced loss is
    /// the one-process loss; torch's sampler would count the padding twice).
    public static func shardWithoutPadding(count: Int, rank: Int, worldSize: Int) -> [Int] {
        Array(stride(from: rank, to: count, by: worldSize))
    }
}
