// The LoRA adapters sharded over the data-parallel ranks as ZeRO-2 shards them: every rank keeps the whole adapter's
// values (its forward needs them), but the summed gradients, the clipping's part of the work and the optimizer state
// only of the tensors it owns.
//
// Ownership is by whole LoRA tensors, contiguous in the trainer's tensor order (the flat buffer's order): rank r owns
// tensors [b_r, b_{r+1}), each cut b_k at the tensor boundary nearest k/W of all elements. A tensor is never cut,
// because 8-bit AdamW quantizes a tensor's state in blocks of 256 counted from the tensor's start (and keeps tensors
// under 4096 elements in fp32): a cut inside a tensor would change its state's bits.
//
// One step, for W ranks:
//   1. Gradients: every rank packs its local gradient sums into a buffer of W equal parts of P elements (P: the largest
//      rank's owned count; rank r's tensors at r·P, zeros after them) and reduce-scatters it. Rank r receives its part
//      summed in rank order: the same bits as that part of the all-reduce the unsharded run makes. Equal parts are what
//      NCCL's reduce-scatter takes; the padding costs at most one tensor's elements per rank (grouped ncclReduce calls
//      to each owner would avoid it, at W calls per bucket instead of one).
//   2. Clipping: ‖g‖² = Σ_t s_t in tensor order, s_t = Σ g_t² (GradientClipping.tensorSquares). The owner of t computes
//      s_t, the others put 0; an all-reduce (in rank order: x + 0 + ... = x exactly) gives every rank every s_t, and
//      every rank combines them in tensor order as the unsharded run does. The norm, so the coefficient, is the
//      unsharded run's bits.
//   3. The optimizer steps the owned tensors only (its state exists only for them).
//   4. The updated values are all-gathered (the same padded parts), so every rank's adapter is whole again.
// Checkpoints: the owners' optimizer state is gathered before rank 0 writes it (the file is the unsharded run's); on
// resume every rank reads the whole file and keeps its own tensors' state.

/// Which rank owns which LoRA tensors, and where each sits in the padded parts.
public struct AdapterOwnership: Equatable, Sendable {
    /// Elements of each tensor, in the trainer's tensor order.
    public let counts: [Int]
    public let worldSize: Int
    /// Tensors owned by each rank (contiguous, in order, covering every tensor once).
    public let ranges: [Range<Int>]
    /// Each tensor's first element within its owner's part.
    public let offsets: [Int]
    /// Elements per part: the largest rank's owned count (every part is padded to it).
    public let partCount: Int

    public init(counts: [Int], worldSize: Int) {
        precondition(worldSize >= 1, "a world of at least one rank")
        self.counts = counts
        self.worldSize = worldSize
        var prefix = [0]
        for n in counts { prefix.append(prefix.last! + n) }
        let total = prefix.last!
        var cuts = [0]
        for k in 1..<worldSize {
            let target = Double(total) * Double(k) / Double(worldSize)
            // The boundary nearest target, never before the previous cut (ties: the earlier boundary).
            var best = cuts.last!
            for b in cuts.last!...counts.count where abs(Double(prefix[b]) - target) < abs(Double(prefix[best]) - target) { best = b }
            cuts.append(best)
        }
        cuts.append(counts.count)
        ranges = (0..<worldSize).map { cuts[$0]..<cuts[$0 + 1] }
        var offsets = [Int](repeating: 0, count: counts.count)
        var largest = 0
        for range in ranges {
            var offset = 0
            for t in range { offsets[t] = offset; offset += counts[t] }
            largest = max(largest, offset)
        }
        self.offsets = offsets
        partCount = largest
    }

    public func owner(ofTensor t: Int) -> Int { ranges.firstIndex { $0.contains(t) }! }

    /// Elements rank r owns (without padding).
    public func ownedCount(rank: Int) -> Int { ranges[rank].reduce(0) { $0 + counts[$1] } }

    // MARK: The flat layout (the GPU trainer's)
    //
    // The GPU trainer keeps every tensor in one flat buffer, in tensor order, each at `starts[t]` (aligned, so with
    // gaps of zeros between them). There the owners' parts need no padded copy: rank r's part is one span of the flat
    // buffer, from its first tensor's start to the next rank's first tensor's start (the gaps go with the tensor
    // before them), and a range of the buffer (a block's gradient bucket) is reduced to the owners of its pieces.

    /// Each rank's span of a flat buffer of `end` elements holding tensor t at `starts[t]` (increasing, each tensor
    /// within its span): rank r's span runs from its first tensor's start to the next owning rank's first start; a
    /// rank without tensors has an empty span. The spans cover [0, end) in rank order.
    public func flatSpans(starts: [Int], end: Int) -> [Range<Int>] {
        precondition(starts.count == counts.count, "flatSpans: \(starts.count) starts for \(counts.count) tensors")
        precondition(zip(starts, starts.dropFirst()).allSatisfy { $0 < $1 } && (starts.last.map { $0 + counts.last! <= end } ?? true),
                     "flatSpans: tensor starts must increase and the last tensor end by \(end)")
        var spans: [Range<Int>] = []
        var lower = 0
        for (r, range) in ranges.enumerated() {
            // The next rank that owns a tensor starts this span's end; the last rank's span runs to the end.
            let next = ranges[(r + 1)...].first { !$0.isEmpty }.map { starts[$0.lowerBound] } ?? end
            let upper = range.isEmpty ? lower : next
            spans.append(lower..<upper)
            lower = upper
        }
        return spans
    }

    /// The pieces of `range` (of the flat buffer whose rank spans are `spans`) by owner, in order, empty ones left out.
    public static func pieces(of range: Range<Int>, spans: [Range<Int>]) -> [(rank: Int, range: Range<Int>)] {
        spans.enumerated().compactMap { r, span in
            let lower = max(span.lowerBound, range.lowerBound), upper = min(span.upperBound, range.upperBound)
            return lower < upper ? (r, lower..<upper) : nil
        }
    }
}

/// The ZeRO-2 exchange of one rank: reduce-scatter of gradients, the sharded clipping norm, the all-gather of values.
public final class ShardedAdapters {
    public let collective: Collective
    public let ownership: AdapterOwnership
    public var rank: Int { collective.rank }
    /// This rank's tensors.
    public var owned: Range<Int> { ownership.ranges[collective.rank] }

    public init(counts: [Int], collective: Collective) {
        self.collective = collective
        ownership = AdapterOwnership(counts: counts, worldSize: collective.worldSize)
    }

    func checkCounts(_ counts: [Int], _ what: String) throws {
        guard counts == ownership.counts else {
            throw UsageError("sharded adapters: \(what) of \(counts.count) tensors do not match the \(ownership.counts.count) tensors the ownership was made for")
        }
    }

    /// Replaces the owned tensors' gradients by their sum over the ranks (the other tensors' gradients are left as this
    /// rank's own sums, which nothing reads).
    public func reduceScatter(_ gradients: [UnsafeMutableBufferPointer<Float>]) throws {
        try checkCounts(gradients.map(\.count), "gradients")
        let o = ownership, p = o.partCount
        var padded = [Float](repeating: 0, count: p * o.worldSize)
        for (r, range) in o.ranges.enumerated() {
            for t in range {
                let base = r * p + o.offsets[t]
                for i in 0..<gradients[t].count { padded[base + i] = gradients[t][i] }
            }
        }
        var part = [Float](repeating: 0, count: p)
        try padded.withUnsafeBufferPointer { v in try part.withUnsafeMutableBufferPointer { try collective.reduceScatter(v, into: $0, .sum) } }
        for t in owned {
            for i in 0..<gradients[t].count { gradients[t][i] = part[o.offsets[t] + i] }
        }
    }

    /// The sum of squares of every tensor's (summed) gradient, by tensor: the owners' values on every rank.
    public func tensorSquares(_ gradients: [UnsafeBufferPointer<Float>]) throws -> [Double] {
        try checkCounts(gradients.map(\.count), "gradients")
        var squares = [Double](repeating: 0, count: gradients.count)
        for t in owned { squares[t] = GradientClipping.tensorSquares(gradients[t]) }
        try collective.allReduce(&squares, .sum)
        return squares
    }

    /// Clips the owned gradients to the global norm `maxNorm` (0: only measures); returns the global norm, the unsharded
    /// run's bits. A non-finite norm leaves the gradients untouched.
    public func clip(_ gradients: [UnsafeMutableBufferPointer<Float>], maxNorm: Double) throws -> Double {
        let total = GradientClipping.combine(try tensorSquares(gradients.map { UnsafeBufferPointer($0) }))
        guard total.isFinite, maxNorm > 0 else { return total }
        let coefficient = GradientClipping.coefficient(norm: total, maxNorm: maxNorm)
        if coefficient < 1 { for t in owned { GradientClipping.scale(gradients[t], by: Float(coefficient)) } }
        return total
    }

    /// Every rank's owned values sent to every rank: afterwards every rank holds the owners' values of every tensor.
    public func allGather(_ values: [UnsafeMutableBufferPointer<Float>]) throws {
        try checkCounts(values.map(\.count), "values")
        let o = ownership, p = o.partCount
        var part = [Float](repeating: 0, count: p)
        for t in owned { for i in 0..<values[t].count { part[o.offsets[t] + i] = values[t][i] } }
        var gathered = [Float](repeating: 0, count: p * o.worldSize)
        try part.withUnsafeBytes { s in try gathered.withUnsafeMutableBytes { try collective.allGather(s, into: $0) } }
        for (r, range) in o.ranges.enumerated() where r != collective.rank {
            for t in range {
                let base = r * p + o.offsets[t]
                for i in 0..<values[t].count { values[t][i] = gathered[base + i] }
            }
        }
    }

    /// The whole optimizer state (as the unsharded optimizer's `state()` lists it) from every rank's `owned` records:
    /// records named `state.<tensor>.<buffer>` come from the tensor's owner, `optimizer.step` from rank 0. Every rank
    /// takes part; every rank receives the whole list.
    public func gatherState(_ records: [TensorRecord], tensorNames: [String]) throws -> [TensorRecord] {
        guard tensorNames.count == ownership.counts.count else {
            throw UsageError("sharded adapters: \(tensorNames.count) tensor names for the \(ownership.counts.count) tensors the ownership was made for")
        }
        let mine = Set(owned.map { tensorNames[$0] })
        let kept = records.filter { r in
            r.name == OptimizerStateRecords.stepName ? collective.rank == 0 : OptimizerStateRecords.split(r.name).map { mine.contains($0.parameter) } ?? false
        }
        let bytes = StateRecordCoding.encode(kept)
        var lengths = [Double](repeating: 0, count: collective.worldSize)
        lengths[collective.rank] = Double(bytes.count)
        try collective.allReduce(&lengths, .sum)
        var all: [TensorRecord] = []
        for r in 0..<collective.worldSize {
            var buffer = r == collective.rank ? bytes : [UInt8](repeating: 0, count: Int(lengths[r]))
            try buffer.withUnsafeMutableBytes { try collective.broadcast($0, root: r) }
            all += try StateRecordCoding.decode(buffer, from: r)
        }
        // The unsharded order: the step, then each tensor's buffers by tensor name (each owner's in its own order).
        let step = all.filter { $0.name == OptimizerStateRecords.stepName }
        var byTensor: [String: [TensorRecord]] = [:]
        for record in all where record.name != OptimizerStateRecords.stepName {
            byTensor[OptimizerStateRecords.split(record.name)!.parameter, default: []].append(record)
        }
        return step + byTensor.keys.sorted().flatMap { byTensor[$0]! }
    }
}

/// Optimizer state records as bytes between ranks: per record the name, dtype, shape and data, each length-prefixed.
enum StateRecordCoding {
    static func encode(_ records: [TensorRecord]) -> [UInt8] {
        var out: [UInt8] = []
        func put(_ v: Int) { withUnsafeBytes(of: UInt64(v).littleEndian) { out.append(contentsOf: $0) } }
        func put(_ s: String) { let u = Array(s.utf8); put(u.count); out += u }
        put(records.count)
        for r in records {
            put(r.name)
            put(r.dtype.rawValue)
            put(r.shape.count)
            for d in r.shape { put(d) }
            put(r.data.count)
            out += r.data
        }
        return out
    }

    static func decode(_ bytes: [UInt8], from rank: Int) throws -> [TensorRecord] {
        var at = 0
        func fail() -> RankFailedError { RankFailedError(rank: rank, "its optimizer state arrived malformed (\(bytes.count) bytes)") }
        func int() throws -> Int {
            guard at + 8 <= bytes.count else { throw fail() }
            var v: UInt64 = 0
            for i in 0..<8 { v |= UInt64(bytes[at + i]) << (8 * UInt64(i)) }
            at += 8
            guard v <= UInt64(bytes.count) * 8 + 64 else { throw fail() }
            return Int(v)
        }
        func data(_ n: Int) throws -> [UInt8] {
            guard n <= bytes.count - at else { throw fail() }
            defer { at += n }
            return Array(bytes[at..<(at + n)])
        }
        func string() throws -> String { String(decoding: try data(try int()), as: UTF8.self) }
        var records: [TensorRecord] = []
        for _ in 0..<(try int()) {
            let name = try string()
            guard let dtype = DType(rawValue: try string()) else { throw fail() }
            let shape = try (0..<(try int())).map { _ in try int() }
            let payload = try data(try int())
            guard shape.reduce(1, *) * dtype.size == payload.count else { throw fail() }
            records.append(TensorRecord(name: name, dtype: dtype, shape: shape, data: payload))
        }
        return records
    }
}
