// The GPU trainer's flat LoRA buffers (CUDADecoderTrainer: fp32 masters, bf16 copies, fp32 gradients), and what one
// ZeRO-2 rank keeps of them (CUDADecoderTrainer+OwnedAdapters.swift). The memory plan counts by the same layout.
//
// Blocks in order; in each, every linear (q, k, v, o, gate, up, down; Phi-3's four fused ones) A [r, in] then
// B [out, r], each matrix starting on a multiple of 128 elements (256 bytes in bf16: cuBLASLt's heuristics assume
// 256-byte aligned operands); the padding stays 0. A linear without an adapter (r = 0) takes no room. Block l's
// elements are [blockStarts[l], blockStarts[l + 1]) (the last block's end is `count`).
//
// ZeRO-2 per owner: rank r keeps fp32 masters and gradients of its span only (AdapterOwnership.flatSpans over the
// tensors: whole tensors, contiguous, with the alignment gaps after them). The backward writes block l's gradients
// into a bucket of the block's elements (`bucketCopy` says which part of it is this rank's own span), which is
// reduced to the owners of its pieces (AdapterOwnership.pieces) and whose own part is copied into the span.

/// The flat LoRA layout of a model's linears (see the header).
public struct LoRAFlatLayout: Equatable, Sendable {
    /// Element offsets of block l's linear j's A and B (`a[l][j]`, `b[l][j]`).
    public let a: [[Int]]
    public let b: [[Int]]
    /// Each block's first element (the blocks lie in order; block l ends where block l + 1 starts).
    public let blockStarts: [Int]
    /// Elements of the whole layout (padding included).
    public let count: Int
    /// Every LoRA tensor in the trainer's order (each linear with an adapter: A, then B): its first element and count.
    public let tensorStarts: [Int]
    public let tensorCounts: [Int]

    /// The layout of linears of `shapes[j]` = (out, in) with LoRA ranks `ranks[l][j]` (0: no adapter).
    public init(shapes: [(out: Int, in: Int)], ranks: [[Int]]) {
        func aligned(_ x: Int) -> Int { (x + 127) / 128 * 128 }
        var offset = 0
        var a: [[Int]] = [], b: [[Int]] = [], starts: [Int] = [], tensorStarts: [Int] = [], tensorCounts: [Int] = []
        for layer in ranks {
            starts.append(offset)
            var blockA: [Int] = [], blockB: [Int] = []
            for (j, shape) in shapes.enumerated() {
                let r = j < layer.count ? layer[j] : 0
                let aOffset = offset
                offset = aligned(offset + r * shape.in)
                let bOffset = offset
                offset = aligned(offset + shape.out * r)
                blockA.append(aOffset)
                blockB.append(bOffset)
                if r > 0 {
                    tensorStarts += [aOffset, bOffset]
                    tensorCounts += [r * shape.in, shape.out * r]
                }
            }
            a.append(blockA)
            b.append(blockB)
        }
        self.a = a
        self.b = b
        blockStarts = starts
        count = offset
        self.tensorStarts = tensorStarts
        self.tensorCounts = tensorCounts
    }

    /// Block l's elements.
    public func blockRange(_ l: Int) -> Range<Int> {
        blockStarts[l]..<(l + 1 < blockStarts.count ? blockStarts[l + 1] : count)
    }

    /// The most elements a block has (a gradient bucket's size).
    public var largestBlock: Int { blockStarts.indices.map { blockRange($0).count }.max() ?? 0 }

    /// Every rank's span of the layout when the adapters are sharded over `worldSize` ranks (ZeRO-2's ownership by
    /// whole tensors, `AdapterOwnership`, laid on this layout by `flatSpans`).
    public func ownerSpans(worldSize: Int) -> [Range<Int>] {
        AdapterOwnership(counts: tensorCounts, worldSize: worldSize).flatSpans(starts: tensorStarts, end: count)
    }

    /// Where a bucket holding `range` of the layout (a block's gradients, at the bucket's element 0) and a buffer
    /// holding `window` (a rank's span, at its element 0) overlap: the bucket's offset, the window buffer's offset
    /// and the elements in common; nil when they do not overlap. The backward loads the rank's running gradients from
    /// the window into the bucket before a block's backward adds to them, and copies the reduced sum back after.
    public static func bucketCopy(of range: Range<Int>, window: Range<Int>) -> (bucketOffset: Int, windowOffset: Int, count: Int)? {
        let lower = max(range.lowerBound, window.lowerBound), upper = min(range.upperBound, window.upperBound)
        guard lower < upper else { return nil }
        return (lower - range.lowerBound, lower - window.lowerBound, upper - lower)
    }
}
