// One GPU rank's share of the frozen NF4 base, sharded over the ranks of an NCCL communicator (the layout and the
// contract are Parallel/ShardedBase.swift's): each block's flat bytes split in W equal shards, this rank's shard of
// every block on its device, and two staging buffers of one whole block each that the trainer's weights point into.
//
// Block l always lives in staging[l % 2], so its CUDANF4Weights are fixed views (the trainer's kernels are the same
// with or without sharding) and the order of use (forward 0 … L−1, backward L−1 … 0, evaluation 0 … L−1) always
// alternates the two buffers. Before block l runs on the main stream, its gather must be done, and the gather of the
// next block goes into the other buffer on the collective's stream, overlapping block l's compute:
//   gather m into s = m % 2:  gather stream waits slotFree[s] (main: the block last in s is done) → ncclAllGather
//                             (every rank's shard of m → staging[s]) → record gathered[s]
//   use l:                    main waits gathered[l % 2]; queue the gather of the next block; compute l;
//                             record slotFree[l % 2]
// A block still in its buffer (the last block, from the forward to the backward) is not gathered again. Every wait
// binds to the latest record of its event when queued, and each event is recorded again only after its wait is
// queued (the next gather into s is queued after block l's wait for gathered[s]), so one event per buffer suffices.
// Every rank gathers the same blocks in the same order (the same steps, the same evaluation batches).

/// The base's shards on this GPU and the staging the trainer reads block weights from.
final class CUDAShardedBase {
    let collective: NCCLCollective
    let layouts: [ShardedBlockLayout]
    /// This rank's bytes of every block.
    let shards: [DeviceBuffer<UInt8>]
    /// Two buffers of the largest block's padded bytes.
    let staging: [DeviceBuffer<UInt8>]
    /// Block l's weights: views into staging[l % 2].
    let weights: [[CUDANF4Weight]]
    private let gathered: [CUDAEvent]
    private let slotFree: [CUDAEvent]
    /// The block each staging buffer holds (or is being gathered into it), nil when none.
    private var resident: [Int?] = [nil, nil]
    /// All-gathers queued so far (the GPU check counts them).
    private(set) var gatherCount = 0

    /// Device bytes a rank holds for `layouts`: its shards and the two staging buffers (as the allocator rounds them).
    static func deviceBytes(_ layouts: [ShardedBlockLayout]) -> Int {
        let s = DeviceAllocator.sizeClass
        return layouts.reduce(0) { $0 + s($1.shardBytes) } + 2 * s(layouts.map(\.paddedBytes).max() ?? 1)
    }

    /// Shards `blocks[l]`'s NF4 weights (as the trainer quantizes them) over `collective`'s ranks and uploads this
    /// rank's shard of each. `code`: the signed dynamic map on the device (shared by every weight that uses it).
    convenience init(blocks: [[QuantizedWeight]], collective: NCCLCollective, code: DeviceBuffer<Float>) throws {
        let a = collective.context.allocator
        var layouts: [ShardedBlockLayout] = []
        var shards: [DeviceBuffer<UInt8>] = []
        for weights in blocks {
            let frozen = try weights.map { try FrozenWeight(quantized: $0) }
            let layout = try ShardedBlockLayout(weights: frozen, worldSize: collective.worldSize)
            let flat = layout.flatten(frozen)
            shards.append(try a.buffer(copying: Array(flat[layout.shardRange(rank: collective.rank)])))
            layouts.append(layout)
        }
        try self.init(layouts: layouts, shards: shards, collective: collective, code: code)
    }

    /// Random weights for benchmarks, as `CUDANF4Weight(randomRows:...)` makes them (uniform codes and absmax codes,
    /// nested absmax 0.01, offset 0.04), made on each rank for its own shard only. `shapes[l]`: block l's [out, in].
    convenience init(randomShapes shapes: [[(out: Int, in: Int)]], collective: NCCLCollective, code: DeviceBuffer<Float>,
                     seed: UInt64) throws {
        let ctx = collective.context
        var layouts: [ShardedBlockLayout] = []
        var shards: [DeviceBuffer<UInt8>] = []
        for (l, block) in shapes.enumerated() {
            let layout = try ShardedBlockLayout(skeletons: block.map { ShardedBlockLayout.nf4Skeleton(rows: $0.out, columns: $0.in, offset: 0.04) },
                                                worldSize: collective.worldSize)
            let shard = try ctx.allocator.buffer(UInt8.self, count: layout.shardBytes)
            try ctx.fillRandomBytes(shard.pointer, count: shard.count, seed: seed &+ UInt64(l) &* 0x9E37_79B9_7F4A_7C15
                                    &+ UInt64(collective.rank))
            // The nested absmax parts (the third part of each weight) hold 0.01: write the bytes of them this shard has.
            let mine = layout.shardRange(rank: collective.rank)
            let pattern = withUnsafeBytes(of: Float(0.01)) { Array($0) }
            for parts in layout.parts {
                let nested = parts[2]
                let lo = max(nested.offset, mine.lowerBound), hi = min(nested.offset + nested.bytes, mine.upperBound)
                guard lo < hi else { continue }
                let bytes = (lo..<hi).map { pattern[($0 - nested.offset) % 4] }
                try ctx.device.copy(toDevice: shard.address(at: lo - mine.lowerBound), from: bytes, bytes: bytes.count)
            }
            shards.append(shard)
            layouts.append(layout)
        }
        try ctx.device.stream.synchronize()
        try self.init(layouts: layouts, shards: shards, collective: collective, code: code)
    }

    private init(layouts: [ShardedBlockLayout], shards: [DeviceBuffer<UInt8>], collective: NCCLCollective, code: DeviceBuffer<Float>) throws {
        let ctx = collective.context
        self.collective = collective
        self.layouts = layouts
        self.shards = shards
        let largest = layouts.map(\.paddedBytes).max() ?? 1
        staging = try (0..<2).map { _ in try ctx.allocator.buffer(UInt8.self, count: largest) }
        gathered = try (0..<2).map { _ in try CUDAEvent(device: ctx.device, timing: false) }
        slotFree = try (0..<2).map { _ in try CUDAEvent(device: ctx.device, timing: false) }
        var weights: [[CUDANF4Weight]] = []
        for (l, layout) in layouts.enumerated() {
            let buffer = staging[l % 2]
            weights.append(try layout.skeletons.enumerated().map { j, skeleton in
                guard case .quantized(.nf4, let blocksize, let shape, _, .doubleQuantized(let blocks, let nestedCount, let offset, let map, let nested))
                        = skeleton, shape.count == 2 else {
                    throw UsageError("the GPU's sharded base takes 2-D NF4 weights with double quantization (block \(l), linear \(j))")
                }
                let parts = layout.parts[j]
                // Each weight's own map when it is not the shared one (bitsandbytes writes the shared one).
                let weightCode = map == DoubleQuantizedAbsmax.signedDynamicMap ? code : try ctx.allocator.buffer(copying: map)
                return CUDANF4Weight(rows: shape[0], columns: shape[1], blocksize: blocksize, nestedBlocksize: nested, offset: offset,
                                     packed: buffer.view(at: parts[0].offset, count: parts[0].bytes),
                                     absmaxCodes: buffer.view(at: parts[1].offset, count: blocks),
                                     nestedAbsmax: buffer.view(as: Float.self, at: parts[2].offset, count: nestedCount),
                                     code: weightCode)
            })
        }
        self.weights = weights
    }

    /// Queues the gather of block `m` into staging[m % 2] on the collective's stream, unless it is there already.
    private func gather(_ m: Int) throws {
        let s = m % 2
        guard resident[s] != m else { return }
        let stream = collective.stream
        try stream.wait(for: slotFree[s])
        try collective.allGatherDevice(shards[m].pointer, into: staging[s].pointer, bytes: layouts[m].shardBytes, stream: stream)
        try gathered[s].record(on: stream)
        resident[s] = m
        gatherCount += 1
    }

    /// Before block `l` runs on the main stream: its weights gathered (usually prefetched already), then the gather of
    /// `next` (the block the trainer runs after it, if any) queued into the other buffer.
    func acquire(_ l: Int, next: Int?) throws {
        try gather(l)
        try collective.context.device.stream.wait(for: gathered[l % 2])
        if let next, next != l { try gather(next) }
    }

    /// After block `l`'s work is queued on the main stream: its buffer may take another block once that work is done.
    func release(_ l: Int) throws {
        try slotFree[l % 2].record(on: collective.context.device.stream)
    }

    /// Waits until no gather is in flight (before the staging buffers go, or a check reads them).
    func synchronize() throws { try collective.stream.synchronize() }
}
