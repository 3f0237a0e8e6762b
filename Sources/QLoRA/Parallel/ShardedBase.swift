// The frozen base sharded across the ranks, as fsdp_qlora's FULL_SHARD shards the 4-bit weights: each rank keeps
// 1/W of every block's frozen storage and the block's whole weights exist only while the block runs (its forward,
// its recomputation and its backward), gathered from all ranks just before and dropped right after.
//
// A block's storage as one flat byte buffer (the same layout on every rank, computed from the shapes alone):
//   for each linear j of the block (q, k, v, o, gate, up, down, or the fused ones), in order:
//     4-bit:  packed codes, then the absmax codes (double quant) or fp32 absmax (plain), then the fp32 nested absmax
//     dense:  the fp32 values
//   every part starting on a 16-byte boundary (so fp32 parts read aligned, on the GPU too);
//   the total padded with zeros to W · S bytes, S = ceil(total / 16W) · 16: rank r keeps bytes [r·S, (r+1)·S), so the
//   shards are equal (what NCCL's all-gather needs) and the padding sits in the last shard(s).
// What every rank keeps whole: the shapes and the few constants of each weight (blocksize, dtype, the double
// quantization's offset and its 256-entry map), the norms, the embedding and the head. On the CPU the gather is a
// plain call (no stream to overlap it with); the GPU trainer gathers into staging buffers on a second stream.

/// Where each part of one block's frozen storage sits in its flat bytes, and how the bytes are split over the ranks.
public struct ShardedBlockLayout: Equatable, Sendable {
    /// What one linear's storage is, without its bulk.
    public enum Skeleton: Equatable, Sendable {
        case dense(rows: Int, columns: Int)
        case quantized(quantType: QuantType, blocksize: Int, shape: [Int], dtype: DType, scales: Scales)
    }

    /// The constants of a 4-bit weight's absmax.
    public enum Scales: Equatable, Sendable {
        case plain(blocks: Int)
        case doubleQuantized(blocks: Int, nestedCount: Int, offset: Float, code: [Float], blocksize: Int)
    }

    /// One contiguous run of bytes: `bytes` at `offset` of the flat buffer.
    public struct Part: Equatable, Sendable {
        public let offset: Int
        public let bytes: Int
    }

    public let skeletons: [Skeleton]
    /// Per linear: its parts in the order the header lists them.
    public let parts: [[Part]]
    /// The flat bytes before padding.
    public let bytes: Int
    public let worldSize: Int
    /// Bytes each rank keeps.
    public let shardBytes: Int
    /// The flat bytes with padding: worldSize × shardBytes.
    public var paddedBytes: Int { shardBytes * worldSize }

    static let alignment = 16

    static func aligned(_ x: Int) -> Int { (x + alignment - 1) / alignment * alignment }

    /// The layout of `weights` (one block's linears) split over `worldSize` ranks. Every weight must be whole.
    public init(weights: [FrozenWeight], worldSize: Int) throws {
        try self.init(skeletons: weights.map { w in
            switch w.storage {
            case .dense(let m):
                return .dense(rows: m.rows, columns: m.columns)
            case .quantized(let q):
                switch q.scales {
                case .plain(let a):
                    return .quantized(quantType: q.quantType, blocksize: q.blocksize, shape: q.shape, dtype: q.dtype, scales: .plain(blocks: a.count))
                case .doubleQuantized(let d):
                    return .quantized(quantType: q.quantType, blocksize: q.blocksize, shape: q.shape, dtype: q.dtype,
                                      scales: .doubleQuantized(blocks: d.codes.count, nestedCount: d.nestedAbsmax.count,
                                                               offset: d.offset, code: d.code, blocksize: d.blocksize))
                }
            case .sharded:
                throw UsageError("a base weight of \(w.rows)×\(w.columns) is already sharded; a base is sharded once")
            }
        }, worldSize: worldSize)
    }

    /// The layout of weights described by `skeletons` (shapes and constants alone) over `worldSize` ranks.
    public init(skeletons: [Skeleton], worldSize: Int) throws {
        guard worldSize >= 1 else { throw UsageError("a sharded base needs a world of at least one rank, not \(worldSize)") }
        var end = 0
        parts = skeletons.map { skeleton in
            Self.partSizes(skeleton).map { size in
                let part = Part(offset: end, bytes: size)
                end = Self.aligned(end + size)
                return part
            }
        }
        self.skeletons = skeletons
        bytes = end
        self.worldSize = worldSize
        shardBytes = max(Self.aligned((end + worldSize - 1) / worldSize), Self.alignment)
    }

    /// Bytes of each part of a weight: dense fp32 values; or packed codes, absmax (codes or fp32), nested absmax.
    static func partSizes(_ skeleton: Skeleton) -> [Int] {
        switch skeleton {
        case .dense(let rows, let columns):
            return [4 * rows * columns]
        case .quantized(_, _, let shape, _, let scales):
            let n = shape.reduce(1, *)
            switch scales {
            case .plain(let blocks): return [(n + 1) / 2, 4 * blocks]
            case .doubleQuantized(let blocks, let nestedCount, _, _, _): return [(n + 1) / 2, blocks, 4 * nestedCount]
            }
        }
    }

    /// The skeleton of a [rows, columns] NF4 weight as the GPU trainer quantizes it: blocksize 64, double quantization
    /// with nested blocksize 256 and the signed dynamic map (for plans and random benchmark weights).
    public static func nf4Skeleton(rows: Int, columns: Int, offset: Float = 0) -> Skeleton {
        let blocks = (rows * columns + 63) / 64
        return .quantized(quantType: .nf4, blocksize: 64, shape: [rows, columns], dtype: .bf16,
                          scales: .doubleQuantized(blocks: blocks, nestedCount: (blocks + 255) / 256, offset: offset,
                                                   code: DoubleQuantizedAbsmax.signedDynamicMap, blocksize: 256))
    }

    /// Rank `rank`'s bytes of the flat buffer: [rank·S, (rank+1)·S).
    public func shardRange(rank: Int) -> Range<Int> { (rank * shardBytes)..<((rank + 1) * shardBytes) }

    /// The weights' flat bytes, padded with zeros to `paddedBytes`.
    public func flatten(_ weights: [FrozenWeight]) -> [UInt8] {
        var flat = [UInt8](repeating: 0, count: paddedBytes)
        flat.withUnsafeMutableBytes { out in
            func put<T>(_ values: [T], _ part: Part) {
                values.withUnsafeBytes { src in
                    precondition(src.count == part.bytes, "a part of \(src.count) bytes where the layout has \(part.bytes)")
                    if part.bytes > 0 { UnsafeMutableRawBufferPointer(rebasing: out[part.offset..<(part.offset + part.bytes)]).copyMemory(from: src) }
                }
            }
            for (j, w) in weights.enumerated() {
                switch w.storage {
                case .dense(let m): put(m.values, parts[j][0])
                case .quantized(let q):
                    put(q.packed, parts[j][0])
                    switch q.scales {
                    case .plain(let a): put(a, parts[j][1])
                    case .doubleQuantized(let d):
                        put(d.codes, parts[j][1])
                        put(d.nestedAbsmax, parts[j][2])
                    }
                case .sharded: preconditionFailure("flatten of a sharded weight")
                }
            }
        }
        return flat
    }

    /// The weights back from the gathered flat bytes (at least `bytes` of them).
    public func weights(from flat: UnsafeRawBufferPointer) throws -> [FrozenWeight] {
        guard flat.count >= bytes else {
            throw UsageError("the gathered block holds \(flat.count) bytes; its layout needs \(bytes)")
        }
        func read<T>(_ part: Part, as: T.Type) -> [T] {
            let count = part.bytes / MemoryLayout<T>.stride
            return [T](unsafeUninitializedCapacity: count) { buffer, initialized in
                if part.bytes > 0 {
                    UnsafeMutableRawBufferPointer(buffer).copyMemory(from: UnsafeRawBufferPointer(rebasing: flat[part.offset..<(part.offset + part.bytes)]))
                }
                initialized = count
            }
        }
        return try skeletons.enumerated().map { j, skeleton in
            switch skeleton {
            case .dense(let rows, let columns):
                return FrozenWeight(dense: Matrix(rows: rows, columns: columns, values: read(parts[j][0], as: Float.self)))
            case .quantized(let quantType, let blocksize, let shape, let dtype, let scales):
                let packed = read(parts[j][0], as: UInt8.self)
                let s: QuantizationScales
                switch scales {
                case .plain:
                    s = .plain(read(parts[j][1], as: Float.self))
                case .doubleQuantized(_, _, let offset, let code, let nestedBlocksize):
                    s = .doubleQuantized(DoubleQuantizedAbsmax(codes: read(parts[j][1], as: UInt8.self),
                                                               nestedAbsmax: read(parts[j][2], as: Float.self),
                                                               offset: offset, code: code, blocksize: nestedBlocksize))
                }
                return try FrozenWeight(quantized: QuantizedWeight(quantType: quantType, blocksize: blocksize, shape: shape, dtype: dtype,
                                                                   packed: packed, scales: s))
            }
        }
    }
}

/// One rank's share of a model's frozen base: its shard of every block, and the gather that makes a block whole for
/// the time it runs. The model's linears hold `.sharded` placeholders between gathers; `DecoderModel` calls
/// `gather` before a block's forward, recomputation or backward and `release` after, so every rank calls the same
/// all-gathers in the same order.
public final class ShardedDecoderBase: @unchecked Sendable {
    public let collective: Collective
    public let layouts: [ShardedBlockLayout]
    /// This rank's bytes of every block.
    private var shards: [[UInt8]]
    private unowned let model: DecoderModel
    /// Blocks whose whole weights are in the model now.
    public private(set) var gathered: Set<Int> = []
    /// All-gathers made (tests count them: one per block use).
    public private(set) var gatherCount = 0

    /// Shards `model`'s base over `collective`'s ranks: keeps this rank's bytes of every block and puts placeholders
    /// in the model's linears (the whole weights go once the model holds no other reference to them). Every rank
    /// must pass the same model; sets `model.shardedBase`.
    public init(model: DecoderModel, collective: Collective) throws {
        self.collective = collective
        self.model = model
        guard model.shardedBase == nil else { throw UsageError("the model's base is already sharded") }
        var layouts: [ShardedBlockLayout] = []
        var shards: [[UInt8]] = []
        for block in model.blocks {
            let weights = block.linears.map(\.weight)
            let layout = try ShardedBlockLayout(weights: weights, worldSize: collective.worldSize)
            let flat = layout.flatten(weights)
            shards.append(Array(flat[layout.shardRange(rank: collective.rank)]))
            layouts.append(layout)
            for linear in block.linears { linear.weight = FrozenWeight(shardedRows: linear.weight.rows, columns: linear.weight.columns) }
        }
        self.layouts = layouts
        self.shards = shards
        model.shardedBase = self
    }

    /// Bytes of base storage this rank keeps (its shards).
    public var shardBytes: Int { shards.reduce(0) { $0 + $1.count } }
    /// Bytes of the whole base storage (without padding).
    public var wholeBytes: Int { layouts.reduce(0) { $0 + $1.bytes } }

    /// The whole flat bytes of block `l`, gathered from every rank (a collective call: every rank makes it).
    public func gatherBytes(_ l: Int) throws -> [UInt8] {
        let layout = layouts[l]
        var flat = [UInt8](repeating: 0, count: layout.paddedBytes)
        try shards[l].withUnsafeBytes { shard in
            try flat.withUnsafeMutableBytes { try collective.allGather(shard, into: $0) }
        }
        gatherCount += 1
        return flat
    }

    /// Makes block `l`'s weights whole in the model (a collective call). A block already gathered stays as it is
    /// (every rank skips alike, since every rank runs the same sequence).
    public func gather(_ l: Int) throws {
        guard !gathered.contains(l) else { return }
        let flat = try gatherBytes(l)
        let weights = try flat.withUnsafeBytes { try layouts[l].weights(from: $0) }
        for (linear, weight) in zip(model.blocks[l].linears, weights) { linear.weight = weight }
        gathered.insert(l)
    }

    /// Drops block `l`'s whole weights again (local: no communication).
    public func release(_ l: Int) {
        guard gathered.remove(l) != nil else { return }
        for linear in model.blocks[l].linears { linear.weight = FrozenWeight(shardedRows: linear.weight.rows, columns: linear.weight.columns) }
    }

    /// Makes every block whole (a collective call), e.g. before generating with the model.
    public func gatherAll() throws { for l in model.blocks.indices { try gather(l) } }
    /// Drops every gathered block.
    public func releaseAll() { for l in model.blocks.indices { release(l) } }
}
