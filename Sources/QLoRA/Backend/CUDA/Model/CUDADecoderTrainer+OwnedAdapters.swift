// ZeRO-2's fp32 masters and gradients per owner in the GPU trainer (CUDATrainingEngine's header has the whole step).
//
// Rank r of W holds fp32 masters and fp32 gradients of its span of the flat LoRA layout only (LoRAFlatLayout:
// AdapterOwnership's whole tensors, contiguous), and every rank keeps the whole bf16 copies the forward and the
// backward's GEMMs read. What moves where:
//   - Gradients. Before block l's backward the main stream fills bucket l mod 2 (the block's elements, fp32) with
//     zeros and copies this rank's running gradients of the block's part of its span into it; the backward's GEMMs
//     add into the bucket with β = 1 exactly as they add into the whole buffer of the plain path. After the block,
//     on NCCL's stream (after an event of the main stream): one in-place ncclReduce per owner of a piece of the block
//     (grouped), then the owner's piece copied back into its span, then an event that frees the bucket for block
//     l − 2. The main stream waits for the last bucket at the end of the backward.
//     Accumulation > 1: every micro-batch is reduced, as DeepSpeed's ZeRO-2 does (a rank cannot keep gradients of
//     tensors it does not own). The owner's running sum goes into its bucket before the backward adds to it, so the
//     owner's result is (its running sum + its own micro-batch's gradients, added by the GEMM's β = 1) + the other
//     ranks' micro-batch gradients, summed by NCCL. In a world of one that is the plain path's arithmetic: the same
//     GEMMs onto the same values, the reduce of one rank the identity, so the bits are the plain path's at any
//     accumulation. Over W ranks the sum order differs from the unsharded run's (one all-reduce after the last
//     micro-batch) by fp32 rounding, as NCCL's order does anyway. The price: A reduces of the gradients a step
//     instead of one (each overlapping the backward), and two buckets of the largest block (70B at r 16: 2 × 9.9 MiB).
//   - Masters. The owners step their tensors (CUDAOptimizer over `parameterSlots()`, which are the owned tensors),
//     convert their span to bf16 and broadcast it in place from each owner (grouped ncclBroadcast of the bf16
//     copies): half the bytes of the fp32 masters, and the same bits every rank would get by converting the fp32
//     values itself (the conversion is exact and deterministic).
//   - The forward's fold (`lora_fold_tail`) reads fp32 B of every linear, which a rank no longer holds: the plan turns
//     the fold off when the masters are sharded over more than one rank (CUDAMemoryPlan); in a world of one the rank
//     holds every master and the fold stays as it is. Feeding it bf16 B would change its bits (s·B is rounded once
//     from fp32 now), and broadcast fp32 masters would be the memory this saves.
//   - The adapter and checkpoints: `gatherLoRAParameters` (every rank) downloads its span and broadcasts it from its
//     owner over the host collective in chunks of 4 MiB (NCCL's staging buffer stays small); rank 0 then writes the
//     adapter. Writing masters (creation, `setLoRAParameters` on resume) goes a block at a time through a bucket: the
//     block's fp32 values are converted into the whole bf16 copies and this rank's part kept as masters.

/// What one rank of sharded masters holds besides its span (see the header): the ownership and the two gradient
/// buckets with their events.
public final class CUDAOwnedAdapters {
    /// Every rank's span of the flat layout (`LoRAFlatLayout.ownerSpans`).
    public let spans: [Range<Int>]
    public let rank: Int
    /// This rank's span: the elements its `params` and `grads` hold (element 0 = the span's first).
    public var window: Range<Int> { spans[rank] }
    public let layout: LoRAFlatLayout
    /// The two gradient buckets, the largest block's elements each: block l's backward writes into buckets[l % 2].
    let buckets: [DeviceBuffer<Float>]
    /// Per bucket: recorded on NCCL's stream after its reduce and copy back; the main stream waits for it before
    /// filling the bucket again.
    let bucketFree: [CUDAEvent]
    var bucketPending = [false, false]
    /// The main stream's end of a block's backward, for NCCL's stream to wait for.
    let backwardDone: CUDAEvent
    /// The bucket the current block's backward writes: its buffer and the elements of the layout it stands for.
    var active: (buffer: DeviceBuffer<Float>, range: Range<Int>)?
    /// The communicator the buckets are reduced over (the engine sets it); nil only in a world of one, where the
    /// bucket is copied back on the main stream.
    public var collective: NCCLCollective?

    init(allocator: DeviceAllocator, device: CUDADevice, layout: LoRAFlatLayout, worldSize: Int, rank: Int) throws {
        guard worldSize >= 1, (0..<worldSize).contains(rank) else {
            throw UsageError("sharded adapters: rank \(rank) outside a world of \(worldSize)")
        }
        self.layout = layout
        self.rank = rank
        spans = layout.ownerSpans(worldSize: worldSize)
        buckets = try (0..<2).map { _ in try allocator.buffer(Float.self, count: max(layout.largestBlock, 1)) }
        bucketFree = try (0..<2).map { _ in try CUDAEvent(device: device, timing: false) }
        backwardDone = try CUDAEvent(device: device, timing: false)
    }
}

extension CUDADecoderTrainer {
    /// How fp32 masters are written under sharded masters: the whole layout's values from the host, or PEFT's
    /// initialisation of every A (Kaiming-uniform, B = 0) from `seed`, as the unsharded trainer makes it.
    enum MasterValues {
        case values([Float])
        case random(seed: UInt64)
    }

    /// The elements this trainer's `params` and `grads` hold (all, unless the masters are sharded).
    var ownedWindow: Range<Int> { ownedAdapters?.window ?? 0..<parameterCount }

    func requireWholeWindow(_ what: String) throws {
        guard ownedWindow == 0..<parameterCount else {
            throw UsageError("\(what): this rank holds the LoRA masters and gradients of \(ownedWindow) of 0..<\(parameterCount) only "
                             + "(sharded adapters); every rank gathers the values with gatherLoRAParameters")
        }
    }

    /// PEFT's A ~ Kaiming-uniform (a = √5), i.e. U(-1/√in, 1/√in), of linear `l` at `pointer`; the values depend on
    /// the seed and A's place in the layout only, so the sharded trainer makes the unsharded one's.
    static func fillKaimingUniform(_ l: TrainerLinear, at pointer: CUdeviceptr, seed: UInt64, context: CUDAContext) throws {
        let bound = 1 / Float(l.inFeatures).squareRoot()
        try context.fillRandomUniform(pointer, count: l.rank * l.inFeatures, seed: seed &+ UInt64(l.aOffset) &+ 303, lo: -bound, hi: bound)
    }

    /// Where the backward adds the gradient of the tensor at element `flat` of the layout: the whole buffer, or under
    /// sharded masters the current block's bucket.
    func gradientAddress(_ flat: Int) -> CUdeviceptr {
        guard let owned = ownedAdapters else { return grads.address(at: flat) }
        guard let active = owned.active, active.range.contains(flat) else {
            preconditionFailure("the LoRA gradient at \(flat) is written outside its block's gradient bucket")
        }
        return active.buffer.address(at: flat - active.range.lowerBound)
    }

    /// The fp32 master at element `flat` of the layout (it must be this rank's).
    func masterAddress(_ flat: Int) -> CUdeviceptr {
        let window = ownedWindow
        precondition(window.contains(flat), "the LoRA master at \(flat) is outside this rank's \(window)")
        return params.address(at: flat - window.lowerBound)
    }

    /// Before block l's backward: its bucket (once its previous reduce is done) holds zeros and this rank's running
    /// gradients of the block's part of its span, and the backward writes into it.
    func openGradientBucket(_ l: Int) throws {
        guard let owned = ownedAdapters else { return }
        let p = l % 2, bucket = owned.buckets[p], range = owned.layout.blockRange(l)
        let stream: CUDAStream = context.device.stream
        if owned.bucketPending[p] { try stream.wait(for: owned.bucketFree[p]) }
        try context.device.memset(bucket.pointer, value: 0, bytes: 4 * range.count)
        if let copy = LoRAFlatLayout.bucketCopy(of: range, window: owned.window) {
            try context.device.copy(deviceTo: bucket.address(at: copy.bucketOffset), from: grads.address(at: copy.windowOffset), bytes: 4 * copy.count)
        }
        owned.active = (bucket, range)
    }

    /// After block l's backward is queued: its bucket reduced to the owners of its pieces (grouped, on NCCL's stream
    /// after the main stream's work so far) and this rank's piece copied back into its span.
    func closeGradientBucket(_ l: Int) throws {
        guard let owned = ownedAdapters, let active = owned.active else { return }
        owned.active = nil
        let range = active.range, device = context.device
        let own = LoRAFlatLayout.bucketCopy(of: range, window: owned.window)
        guard let nccl = owned.collective else {
            guard owned.spans.count == 1 else {
                throw UsageError("sharded adapters over \(owned.spans.count) ranks need the NCCL communicator to reduce their gradients")
            }
            if let own {
                try device.copy(deviceTo: grads.address(at: own.windowOffset), from: active.buffer.address(at: own.bucketOffset), bytes: 4 * own.count)
            }
            return
        }
        try owned.backwardDone.record(on: device.stream)
        try nccl.stream.wait(for: owned.backwardDone)
        try nccl.group {
            for piece in AdapterOwnership.pieces(of: range, spans: owned.spans) {
                try nccl.reduceDevice(active.buffer.address(at: piece.range.lowerBound - range.lowerBound), count: piece.range.count, root: piece.rank)
            }
        }
        if let own {
            try device.copy(deviceTo: grads.address(at: own.windowOffset), from: active.buffer.address(at: own.bucketOffset), bytes: 4 * own.count,
                            stream: nccl.stream)
        }
        try owned.bucketFree[l % 2].record(on: nccl.stream)
        owned.bucketPending[l % 2] = true
    }

    /// The main stream waits for every bucket's reduce and copy back (the end of a backward; before the buckets are
    /// used as staging).
    func finishGradientBuckets() throws {
        guard let owned = ownedAdapters else { return }
        for p in 0..<2 where owned.bucketPending[p] { try context.device.stream.wait(for: owned.bucketFree[p]) }
    }

    /// Sharded masters: the whole layout's values (or PEFT's initialisation) written a block at a time through a
    /// bucket: each block converted into the bf16 copies, this rank's part kept as its masters.
    func writeMasters(_ values: MasterValues) throws {
        guard let owned = ownedAdapters else { throw UsageError("writeMasters: the masters are not sharded") }
        try finishGradientBuckets()
        let stage = owned.buckets[0], ctx = context
        for (l, block) in blocks.enumerated() {
            let range = owned.layout.blockRange(l)
            guard !range.isEmpty else { continue }
            switch values {
            case .values(let host):
                try stage.upload(Array(host[range]))
            case .random(let seed):
                try ctx.device.memset(stage.pointer, value: 0, bytes: 4 * range.count)
                for linear in block.linears where linear.rank > 0 {
                    try Self.fillKaimingUniform(linear, at: stage.address(at: linear.aOffset - range.lowerBound), seed: seed, context: ctx)
                }
            }
            try ctx.convertToBF16(stage, into: params16.view(as: UInt16.self, at: range.lowerBound, count: range.count), count: range.count)
            if let copy = LoRAFlatLayout.bucketCopy(of: range, window: owned.window) {
                try ctx.device.copy(deviceTo: params.address(at: copy.windowOffset), from: stage.address(at: copy.bucketOffset), bytes: 4 * copy.count)
            }
        }
    }

    /// ZeRO-2, after the owners stepped: each rank's span of the bf16 copies converted from its masters and
    /// broadcast from it (grouped, in place, on the collective's stream between the main stream's work before and
    /// after), so every rank's copies are whole again.
    public func publishOwnedParameters(over collective: NCCLCollective) throws {
        guard let owned = ownedAdapters else { throw UsageError("publishOwnedParameters: the masters are not sharded") }
        try refreshParameterCopies()
        try collective.afterMainStream { nccl in
            try nccl.group {
                for (r, span) in owned.spans.enumerated() where !span.isEmpty {
                    try nccl.broadcastDevice(params16.address(at: span.lowerBound), bytes: 2 * span.count, root: r)
                }
            }
        }
    }

    /// Elements per host broadcast of `gatherLoRAParameters` (NCCL's host staging buffer grows to the largest).
    static let gatherChunkElements = 1 << 20

    /// Every rank: the whole adapter's fp32 masters, each span sent from its owner (waits for the GPU). Every rank
    /// receives every LoRA matrix, (module path, A, B).
    public func gatherLoRAParameters(over collective: Collective) throws -> [(name: String, a: [Float], b: [Float])] {
        guard let owned = ownedAdapters else { return try loraParameters() }
        guard collective.worldSize == owned.spans.count, collective.rank == owned.rank else {
            throw UsageError("gatherLoRAParameters: rank \(collective.rank) of \(collective.worldSize) for masters sharded as rank \(owned.rank) of \(owned.spans.count)")
        }
        let mine = try params.download()
        var all = [Float](repeating: 0, count: parameterCount)
        for (r, span) in owned.spans.enumerated() where !span.isEmpty {
            var part = r == owned.rank ? Array(mine.prefix(span.count)) : [Float](repeating: 0, count: span.count)
            try part.withUnsafeMutableBytes { raw in
                for start in stride(from: 0, to: span.count, by: Self.gatherChunkElements) {
                    let end = min(start + Self.gatherChunkElements, span.count)
                    try collective.broadcast(UnsafeMutableRawBufferPointer(rebasing: raw[(4 * start)..<(4 * end)]), root: r)
                }
            }
            all.replaceSubrange(span, with: part)
        }
        return slices(of: all)
    }
}

extension CUDADecoderTrainer {
    /// The fp32 masters this trainer holds, its window of the flat layout (all of it unless sharded; waits for the GPU).
    public func ownedMasterValues() throws -> [Float] { Array(try params.download().prefix(ownedWindow.count)) }

    /// The bf16 copies of every LoRA tensor, the whole flat layout (every rank holds them; waits for the GPU).
    public func parameterCopies() throws -> [UInt16] { try params16.download() }
}
