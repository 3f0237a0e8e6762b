import XCTest
@testable import QLoRA

/// ZeRO-2's fp32 masters and gradients per owner in the GPU trainer (CUDADecoderTrainer+OwnedAdapters.swift): the flat
/// layout it and the plan share (LoRAFlatLayout), each rank's span, the bucket's overlap with a rank's span, and the
/// backward's bucket protocol emulated for W ranks on the host with exactly the functions the GPU path calls; and the
/// plan's count of each rank's masters, gradients and buckets.
final class OwnedAdapterMastersTests: XCTestCase {
    /// Uneven shapes and ranks (a linear without an adapter, ranks differing by block), so that ownership is uneven
    /// and the blocks' buckets cross owners.
    static let shapes: [(out: Int, in: Int)] = [(96, 96), (32, 96), (256, 96), (96, 96), (96, 256)]
    static let ranks: [[Int]] = [[4, 4, 8, 0, 4], [16, 4, 8, 2, 4], [4, 0, 0, 0, 4], [8, 8, 8, 8, 8]]

    /// The layout: each matrix on 128 elements, A then B of each linear with an adapter in order, r = 0 taking no room;
    /// the blocks partition [0, count); the spans of worlds 1–7 cover it in rank order, each tensor inside its owner's.
    func testFlatLayoutAndOwnerSpans() {
        let layout = LoRAFlatLayout(shapes: Self.shapes, ranks: Self.ranks)
        func aligned(_ x: Int) -> Int { (x + 127) / 128 * 128 }
        var end = 0, starts: [Int] = [], counts: [Int] = []
        for (l, layer) in Self.ranks.enumerated() {
            XCTAssertEqual(layout.blockStarts[l], end)
            for (j, r) in layer.enumerated() {
                XCTAssertEqual(layout.a[l][j], end)
                end = aligned(end + r * Self.shapes[j].in)
                XCTAssertEqual(layout.b[l][j], end)
                if r > 0 { starts += [layout.a[l][j], end]; counts += [r * Self.shapes[j].in, Self.shapes[j].out * r] }
                end = aligned(end + Self.shapes[j].out * r)
            }
        }
        XCTAssertEqual(layout.count, end)
        XCTAssertEqual(layout.tensorStarts, starts)
        XCTAssertEqual(layout.tensorCounts, counts)
        XCTAssertEqual((0..<Self.ranks.count).map { layout.blockRange($0).count }.reduce(0, +), end)
        XCTAssertEqual(layout.largestBlock, (0..<Self.ranks.count).map { layout.blockRange($0).count }.max())
        for world in 1...7 {
            let spans = layout.ownerSpans(worldSize: world)
            let o = AdapterOwnership(counts: counts, worldSize: world)
            XCTAssertEqual(spans, o.flatSpans(starts: starts, end: end))
            XCTAssertEqual(spans.count, world)
            XCTAssertEqual(spans.first?.lowerBound, 0)
            XCTAssertEqual(spans.last?.upperBound, end)
            for r in 1..<world { XCTAssertEqual(spans[r].lowerBound, spans[r - 1].upperBound) }
            for t in counts.indices {
                let span = spans[o.owner(ofTensor: t)]
                XCTAssertTrue(span.contains(starts[t]) && starts[t] + counts[t] <= span.upperBound, "world \(world): tensor \(t)")
            }
            // A span of a rank that owns something starts at one of its tensors.
            for (r, span) in spans.enumerated() where !span.isEmpty { XCTAssertEqual(span.lowerBound, starts[o.ranges[r].lowerBound]) }
            if world > 2 {
                let crossing = (0..<Self.ranks.count).filter { AdapterOwnership.pieces(of: layout.blockRange($0), spans: spans).count > 1 }
                XCTAssertFalse(crossing.isEmpty, "world \(world): some bucket crosses owners")
            }
        }
        // The plan's layout is the trainer's.
        let c = Architecture.llama3_2_1b.config
        let plan = CUDAMemoryPlan(config: c, tokens: 256, rank: 16)
        XCTAssertEqual(plan.loraLayout, LoRAFlatLayout(shapes: CUDAMemoryPlan.linearShapes(c), ranks: plan.request.ranks))
    }

    /// `bucketCopy`: the overlap of a bucket's range and a window, in each one's own coordinates; every pair of small
    /// ranges against the set intersection.
    func testBucketCopyIsTheOverlap() {
        for a in 0...6 { for b in a...7 { for c in 0...6 { for d in c...7 {
            let range = a..<b, window = c..<d
            let common = Set(range).intersection(Set(window))
            guard let copy = LoRAFlatLayout.bucketCopy(of: range, window: window) else {
                XCTAssertTrue(common.isEmpty, "\(range) \(window)")
                continue
            }
            XCTAssertEqual(copy.count, common.count)
            XCTAssertEqual(range.lowerBound + copy.bucketOffset, common.min())
            XCTAssertEqual(window.lowerBound + copy.windowOffset, common.min())
        } } } }
    }

    /// The backward's buckets for W ranks (1–7) and A micro-batches (1–3), emulated on the host with the functions the
    /// GPU path calls (blockRange, ownerSpans, bucketCopy, AdapterOwnership.pieces): before each block's backward (last
    /// block first) each rank's bucket is zeros with its running gradients of its span put in; the backward adds its
    /// micro-batch's gradients (the GEMM with β = 1: bucket + g); the pieces are summed to their owners (in rank
    /// order, as a stand-in for NCCL's); the owner copies its piece back. In a world of one that is the plain path's
    /// accumulation bit for bit; over W ranks every owner holds Σ over micro-batches of (its running sum + its own
    /// gradients) + the other ranks' gradients, every element reduced once a micro-batch, the gaps zero.
    func testBucketProtocolAccumulatesToTheOwners() {
        let layout = LoRAFlatLayout(shapes: Self.shapes, ranks: Self.ranks)
        let end = layout.count, blocks = Self.ranks.count
        var inTensor = [Bool](repeating: false, count: end)
        for (s, n) in zip(layout.tensorStarts, layout.tensorCounts) { for i in s..<(s + n) { inTensor[i] = true } }
        for world in 1...7 {
            for accumulation in 1...3 {
                let spans = layout.ownerSpans(worldSize: world)
                var rng = SeededGenerator(seed: UInt64(100 * world + accumulation))
                // local[m][r][i]: rank r's gradients of micro-batch m (the gaps zero), order-sensitive magnitudes.
                let local: [[[Float]]] = (0..<accumulation).map { _ in (0..<world).map { _ in
                    (0..<end).map { i in inTensor[i] ? Float.random(in: -1...1, using: &rng) * (i % 3 == 0 ? 1e4 : 1e-3) : 0 }
                } }
                // Each rank's gradients: its span only (zero at the first micro-batch, as the trainer fills them).
                var windows = spans.map { [Float](repeating: 0, count: $0.count) }
                var touched = [Int](repeating: 0, count: end)
                for m in 0..<accumulation {
                    for l in stride(from: blocks - 1, through: 0, by: -1) {
                        let range = layout.blockRange(l)
                        // Open: zeros, the running sum of the rank's part, then the backward's β = 1 adds.
                        var buckets = (0..<world).map { r -> [Float] in
                            var bucket = [Float](repeating: 0, count: range.count)
                            if let copy = LoRAFlatLayout.bucketCopy(of: range, window: spans[r]) {
                                for k in 0..<copy.count { bucket[copy.bucketOffset + k] = windows[r][copy.windowOffset + k] }
                            }
                            for k in 0..<range.count { bucket[k] += local[m][r][range.lowerBound + k] }
                            return bucket
                        }
                        // Close: each piece reduced to its owner, whose piece is copied back.
                        let pieces = AdapterOwnership.pieces(of: range, spans: spans)
                        XCTAssertEqual(pieces.map(\.range.count).reduce(0, +), range.count)
                        for piece in pieces {
                            for i in piece.range {
                                var sum = buckets[0][i - range.lowerBound]
                                for r in 1..<world { sum += buckets[r][i - range.lowerBound] }
                                buckets[piece.rank][i - range.lowerBound] = sum
                                touched[i] += 1
                            }
                        }
                        for r in 0..<world {
                            if let copy = LoRAFlatLayout.bucketCopy(of: range, window: spans[r]) {
                                for k in 0..<copy.count { windows[r][copy.windowOffset + k] = buckets[r][copy.bucketOffset + k] }
                            }
                        }
                    }
                }
                XCTAssertTrue(touched.allSatisfy { $0 == accumulation }, "world \(world): every element reduced once a micro-batch")
                for i in 0..<end {
                    let owner = spans.firstIndex { $0.contains(i) }!
                    let value = windows[owner][i - spans[owner].lowerBound]
                    // The expected arithmetic: v = ((v + own) + the others in rank order) per micro-batch.
                    var expected: Float = 0
                    for m in 0..<accumulation {
                        var sum: Float = 0
                        for r in 0..<world { sum = r == 0 ? (owner == 0 ? expected + local[m][0][i] : local[m][0][i]) : sum + (r == owner ? expected + local[m][r][i] : local[m][r][i]) }
                        expected = sum
                    }
                    XCTAssertEqual(value.bitPattern, expected.bitPattern, "world \(world), accumulation \(accumulation), element \(i)")
                    if !inTensor[i] { XCTAssertEqual(value, 0, "a gap stays zero") }
                    if world == 1 {
                        // The plain path: g += micro-batch m's gradients, one micro-batch after the other.
                        var plain: Float = 0
                        for m in 0..<accumulation { plain += local[m][0][i] }
                        XCTAssertEqual(value.bitPattern, plain.bitPattern, "world of one = the plain accumulation, element \(i)")
                    } else {
                        var exact = 0.0
                        for m in 0..<accumulation { for r in 0..<world { exact += Double(local[m][r][i]) } }
                        XCTAssertEqual(Double(value), exact, accuracy: 1e-6 * 1e4 * Double(world * accumulation))
                    }
                }
            }
        }
    }

    /// The plan with ZeRO-2 masters (`adaptersShardedOver` with an optimizer kind): each rank's fp32 masters and
    /// gradients are the largest rank's span, plus two fp32 buckets of the largest block, the bf16 copies whole; over
    /// more than one rank the forward's fold is off (its buffers leave the activations and workspace); a world of one
    /// keeps the fold and holds every master (plus the buckets). By hand for the 8B shape (32 identical blocks: two
    /// ranks own 16 blocks each, exactly half the layout).
    func testPlanCountsEachRanksMastersGradientsAndBuckets() {
        let c = Architecture.llama3_1_8b.config
        let s = DeviceAllocator.sizeClass
        let layout = LoRAFlatLayout(shapes: CUDAMemoryPlan.linearShapes(c), ranks: Array(repeating: Array(repeating: 16, count: 7), count: c.layerCount))
        let p = layout.count, block = layout.largestBlock
        XCTAssertEqual(block * c.layerCount, p, "identical blocks")
        let whole = CUDAMemoryPlan(config: c, tokens: 2048, rank: 16, optimizer: .pagedAdamw8bit)
        XCTAssertEqual(whole.adapters, 2 * s(4 * p) + s(2 * p))
        XCTAssertNil(whole.ownedAdapterElements)
        let one = CUDAMemoryPlan(config: c, tokens: 2048, rank: 16, optimizer: .pagedAdamw8bit, adaptersShardedOver: 1)
        XCTAssertEqual(one.adapters, whole.adapters + 2 * s(4 * block), "a world of one: every master, and the two buckets")
        XCTAssertEqual(one.gradientBuckets, 2 * s(4 * block))
        XCTAssertTrue(one.memory.foldLoRA && whole.memory.foldLoRA)
        XCTAssertEqual(one.total - one.adapters, whole.total - whole.adapters)
        let two = CUDAMemoryPlan(config: c, tokens: 2048, rank: 16, optimizer: .pagedAdamw8bit, adaptersShardedOver: 2)
        XCTAssertEqual(two.ownedAdapterElements, p / 2)
        XCTAssertEqual(two.adapters, 2 * s(4 * p / 2) + s(2 * p) + 2 * s(4 * block))
        XCTAssertFalse(two.memory.foldLoRA, "no rank holds every fp32 B the fold reads")
        XCTAssertTrue("\(two)".contains("ZeRO-2: fp32 masters and gradients of \(p / 2) elements"), "\(two)")
        // Like for like: against the whole plan without the fold, only the adapters and the optimizer state change.
        var noFold = CUDATrainerMemoryOptions.automatic(for: c)
        noFold.foldLoRA = false
        let wholeNoFold = whole.replanned(memory: noFold)
        XCTAssertEqual(two.total - two.adapters - two.optimizer, wholeNoFold.total - wholeNoFold.adapters - wholeNoFold.optimizer)
        // The trainer's own AdamW (no kind) is never sharded.
        XCTAssertNil(CUDAMemoryPlan(config: c, tokens: 2048, rank: 16, adaptersShardedOver: 2).ownedAdapterElements)
        // Worlds 3–7: the largest span, uneven.
        for world in 3...7 {
            let plan = CUDAMemoryPlan(config: c, tokens: 2048, rank: 16, optimizer: .adamw, adaptersShardedOver: world)
            let largest = layout.ownerSpans(worldSize: world).map(\.count).max()!
            XCTAssertEqual(plan.ownedAdapterElements, largest)
            XCTAssertEqual(plan.adapters, 2 * s(4 * largest) + s(2 * p) + 2 * s(4 * block), "world \(world)")
        }
    }
}
