// The data-parallel contract: what every rank of a training job can ask of the others.
//
// A rank is one trainer with its own engine and its own copy of the adapter. The ranks stay identical because they
// start from the same adapter (the same seed, or the same checkpoint) and apply the same summed gradients with the
// same optimizer. Everything they exchange goes through a `Collective`:
//   - `allReduce`: every rank ends with the elementwise sum (or mean) of every rank's buffer. Implementations add the
//     contributions in rank order (0, 1, ..., W−1), so every rank holds the same bits afterwards.
//   - `broadcast`: every rank ends with the root's bytes.
//   - `reduceScatter`: every rank passes W equal parts and ends with its own part (rank r: part r) of the sum (or
//     mean) over the ranks, added in rank order: the same bits as that part of `allReduce`'s result. ZeRO-style
//     sharding of the adapters reduces each rank's gradients this way instead of all-reducing them.
//   - `allGather`: every rank ends with all ranks' shards (bytes, the same count on every rank) concatenated in rank
//     order; the sharded base (ShardedBase.swift) rebuilds a block's frozen weights from its shards this way.
//   - `barrier`: no rank passes until every rank has arrived.
//   - `abort`: this rank failed; the others' next (or pending) call throws `RankFailedError` with the message, so a
//     failing rank stops the job instead of leaving the others waiting.
//
// Implementations: `LocalCollective` (a world of one: the plain single-process run), `ThreadWorld` (N ranks as
// threads of one process, for tests), `SocketCollective` (N processes over TCP, CPU ranks) and, on GPUs,
// `NCCLCollective` (Backend/CUDA/NCCL.swift), which also reduces device buffers on a stream.

/// How `allReduce` combines the ranks' buffers.
public enum ReduceOperation: Sendable {
    case sum
    /// The sum divided by the world size.
    case average
}

/// The messages that cross ranks: a sum (or mean) of float buffers, one rank's bytes, a rendezvous point.
public protocol Collective: AnyObject {
    /// This process's (or thread's) rank, 0..<worldSize.
    var rank: Int { get }
    var worldSize: Int { get }
    /// In place: every rank's `values` become the elementwise sum (mean) of all ranks' `values` (same count on every rank).
    func allReduce(_ values: UnsafeMutableBufferPointer<Float>, _ operation: ReduceOperation) throws
    func allReduce(_ values: UnsafeMutableBufferPointer<Double>, _ operation: ReduceOperation) throws
    /// `values` (worldSize × shard.count, the same count on every rank) summed (averaged) over the ranks in rank order;
    /// this rank receives its part, elements [rank · shard.count, (rank + 1) · shard.count) of the sum, in `shard`.
    func reduceScatter(_ values: UnsafeBufferPointer<Float>, into shard: UnsafeMutableBufferPointer<Float>, _ operation: ReduceOperation) throws
    /// In place: every rank's `bytes` become the `root` rank's (same count on every rank).
    func broadcast(_ bytes: UnsafeMutableRawBufferPointer, root: Int) throws
    /// Every rank's `shard` (the same byte count on every rank) concatenated in rank order into `gathered`, which
    /// holds worldSize × shard.count bytes.
    func allGather(_ shard: UnsafeRawBufferPointer, into gathered: UnsafeMutableRawBufferPointer) throws
    /// Returns once every rank has called it.
    func barrier() throws
    /// Tells the other ranks that this one failed with `message` (best effort; never throws).
    func abort(_ message: String)
}

extension Collective {
    public var isMainRank: Bool { rank == 0 }

    public func allReduce(_ values: inout [Float], _ operation: ReduceOperation = .sum) throws {
        try values.withUnsafeMutableBufferPointer { try allReduce($0, operation) }
    }

    public func allReduce(_ values: inout [Double], _ operation: ReduceOperation = .sum) throws {
        try values.withUnsafeMutableBufferPointer { try allReduce($0, operation) }
    }

    /// This rank's part of the sum (mean) of every rank's `values` (worldSize equal parts).
    public func reduceScatter(_ values: [Float], _ operation: ReduceOperation = .sum) throws -> [Float] {
        var shard = [Float](repeating: 0, count: values.count / max(worldSize, 1))
        try values.withUnsafeBufferPointer { v in try shard.withUnsafeMutableBufferPointer { try reduceScatter(v, into: $0, operation) } }
        return shard
    }

    /// The root's value of a Double (every rank passes its own; all get the root's).
    public func broadcast(_ value: Double, root: Int = 0) throws -> Double {
        var v = value
        try withUnsafeMutableBytes(of: &v) { try broadcast($0, root: root) }
        return v
    }

    /// The root's bytes (every rank passes a buffer of the same count).
    public func broadcast(_ bytes: [UInt8], root: Int = 0) throws -> [UInt8] {
        var b = bytes
        try b.withUnsafeMutableBytes { try broadcast($0, root: root) }
        return b
    }

    /// True on every rank when any rank passes true.
    public func any(_ flag: Bool) throws -> Bool {
        guard worldSize > 1 else { return flag }
        var v = [flag ? 1.0 : 0.0]
        try allReduce(&v, .sum)
        return v[0] > 0
    }
}

/// A world of one: the single-process run. Every operation leaves the buffers as they are.
public final class LocalCollective: Collective {
    public init() {}
    public var rank: Int { 0 }
    public var worldSize: Int { 1 }
    public func allReduce(_ values: UnsafeMutableBufferPointer<Float>, _ operation: ReduceOperation) throws {}
    public func allReduce(_ values: UnsafeMutableBufferPointer<Double>, _ operation: ReduceOperation) throws {}
    public func reduceScatter(_ values: UnsafeBufferPointer<Float>, into shard: UnsafeMutableBufferPointer<Float>,
                              _ operation: ReduceOperation) throws {
        try checkScatterSizes(values: values.count, shard: shard.count, worldSize: 1)
        for i in 0..<shard.count { shard[i] = values[i] }
    }
    public func broadcast(_ bytes: UnsafeMutableRawBufferPointer, root: Int) throws {
        guard root == 0 else { throw UsageError("broadcast from rank \(root) in a world of one rank") }
    }
    public func allGather(_ shard: UnsafeRawBufferPointer, into gathered: UnsafeMutableRawBufferPointer) throws {
        try checkGatherSizes(shard: shard.count, gathered: gathered.count, worldSize: 1)
        if shard.count > 0 { gathered.copyMemory(from: shard) }
    }
    public func barrier() throws {}
    public func abort(_ message: String) {}
}

/// The gathered buffer holds exactly one shard per rank.
func checkGatherSizes(shard: Int, gathered: Int, worldSize: Int) throws {
    guard gathered == shard * worldSize else {
        throw UsageError("allGather: a buffer of \(gathered) bytes for \(worldSize) shards of \(shard) bytes; expected \(shard * worldSize)")
    }
}

/// The reduced buffer holds exactly one part per rank.
func checkScatterSizes(values: Int, shard: Int, worldSize: Int) throws {
    guard values == shard * worldSize else {
        throw UsageError("reduceScatter: \(values) values for \(worldSize) parts of \(shard); expected \(shard * worldSize)")
    }
}

/// Another rank failed (or went away): this rank stops too, with that rank's message.
public struct RankFailedError: Error, CustomStringConvertible {
    /// The rank that failed, when known.
    public let rank: Int?
    public let message: String
    public init(rank: Int?, _ message: String) {
        self.rank = rank
        self.message = message
    }
    public var description: String { rank.map { "rank \($0) failed: \(message)" } ?? message }
}

/// Buffers of different ranks disagree in size: a bug or mismatched launches, never a silent truncation.
func checkSameCount(_ counts: [Int], what: String) throws {
    guard let first = counts.first, counts.allSatisfy({ $0 == first }) else {
        throw UsageError("\(what): the ranks passed buffers of different sizes (\(counts.map(String.init).joined(separator: ", ")) elements); "
                         + "every rank must run the same configuration")
    }
}

/// Adds the ranks' buffers in rank order into `result` (so every rank computes the same bits), then divides for a mean.
func reduceInRankOrder<T: BinaryFloatingPoint>(_ sources: [UnsafeBufferPointer<T>], into result: UnsafeMutableBufferPointer<T>,
                                              _ operation: ReduceOperation) {
    guard let first = sources.first else { return }
    for i in 0..<result.count { result[i] = first[i] }
    for source in sources.dropFirst() {
        for i in 0..<result.count { result[i] += source[i] }
    }
    if operation == .average {
        let w = T(sources.count)
        for i in 0..<result.count { result[i] /= w }
    }
}
