import XCTest
@testable import QLoRA

/// The backward's fold (LoRAFoldLayout.swift's LoRABackwardFold) and the paged optimizer's chunks, as the plan and the
/// GPU trainer size them; the GPU paths themselves are checked by qlora-gpu-check ("lora fold", "paged optimizer").
final class LoRABackwardFoldTests: XCTestCase {
    /// o_proj and down_proj fold (separate or Phi-3's fused projections), with the largest rank of the two as the
    /// residual gradient's spare columns; nothing folds under Gemma's sandwich norms or with the fold off.
    func testWhichLinearsFold() {
        let llama = Architecture.llama3_1_8b.config
        var ranks = Array(repeating: [16, 16, 16, 8, 16, 16, 4], count: llama.layerCount)
        ranks[3][3] = 32  // one block's o at a larger rank
        let fold = LoRABackwardFold(config: llama, ranks: ranks, enabled: true)
        XCTAssertEqual(fold.folds, [false, false, false, true, false, false, true])
        XCTAssertEqual(fold.extraRows, [0, 0, 0, 32, 0, 0, 4])
        XCTAssertEqual(fold.residualColumns, 32)
        let off = LoRABackwardFold(config: llama, ranks: ranks, enabled: false)
        XCTAssertEqual(off.residualColumns, 0)
        XCTAssertEqual(off.extraRows, [0, 0, 0, 0, 0, 0, 0])
        let phi = Architecture.phi4_mini.config
        XCTAssertTrue(phi.fusedProjections)
        let fused = LoRABackwardFold(config: phi, ranks: Array(repeating: [16, 8, 16, 12], count: phi.layerCount), enabled: true)
        XCTAssertEqual(fused.folds, [false, true, false, true])
        XCTAssertEqual(fused.residualColumns, 12)
        let gemma = Architecture.gemma2_9b.config
        XCTAssertTrue(gemma.sandwichNorms)
        let sandwich = LoRABackwardFold(config: gemma, ranks: Array(repeating: Array(repeating: 16, count: 7), count: gemma.layerCount),
                                        enabled: true)
        XCTAssertEqual(sandwich.residualColumns, 0, "o's and down's dy is dNorm under sandwich norms: no fold")
        // No adapter on o or down: nothing to fold, no spare columns.
        let none = LoRABackwardFold(config: llama, ranks: Array(repeating: [16, 16, 16, 0, 16, 16, 0], count: llama.layerCount), enabled: true)
        XCTAssertEqual(none.residualColumns, 0)
    }

    /// The plan counts the fold's bytes: the residual gradient's R columns (2·N·R) and A's rows under o's and down's W
    /// (the one weight scratch is down's [H + r, I] when it is the largest; kept weights: every slot).
    func testPlanCountsTheBackwardFold() {
        let c = Architecture.llama3_1_8b.config, n = 4096, r = 16
        let s = DeviceAllocator.sizeClass
        var memory = CUDATrainerMemoryOptions.automatic(for: c)
        XCTAssertFalse(memory.foldLoRABackward, "off by default until a GPU has measured it")
        let plain = CUDAMemoryPlan(config: c, tokens: n, rank: r, memory: memory)
        memory.foldLoRABackward = true
        let folded = CUDAMemoryPlan(config: c, tokens: n, rank: r, memory: memory)
        XCTAssertEqual(folded.activations - plain.activations, s(2 * n * (c.hiddenSize + r)) - s(2 * n * c.hiddenSize))
        // The largest weight scratch: gate/up [I, H + their folded tail] or down [H + r, I + r] with the fold.
        let gateK = c.hiddenSize + 2 * r, downK = c.intermediateSize + r
        XCTAssertEqual(plain.workspace, s(2 * max(c.intermediateSize * gateK, c.hiddenSize * downK)) + (32 << 20))
        XCTAssertEqual(folded.workspace, s(2 * max(c.intermediateSize * gateK, (c.hiddenSize + r) * downK)) + (32 << 20))
        XCTAssertTrue("\(folded.memory)".contains("the LoRA backward folded"), "\(folded.memory)")
        // Kept block weights: o's and down's slots each r rows longer.
        memory.keepBlockWeights = true
        let keptFolded = CUDAMemoryPlan(config: c, tokens: n, rank: r, memory: memory)
        memory.foldLoRABackward = false
        let kept = CUDAMemoryPlan(config: c, tokens: n, rank: r, memory: memory)
        let columns = LoRAFoldLayout.widestK(c, ranks: Array(repeating: Array(repeating: r, count: 7), count: c.layerCount))
        let extra = [0, 0, 0, r, 0, 0, r]
        XCTAssertEqual(CUDAMemoryPlan.blockWeightSlots(c, columns: columns, extraRows: extra).count
                           - CUDAMemoryPlan.blockWeightSlots(c, columns: columns).count,
                       r * columns[3] + r * columns[6])
        // The kept slots as the plan counts them (one weight's scratch and the rest: the slots' bytes, size-classed).
        XCTAssertEqual(keptFolded.workspace, s(2 * CUDAMemoryPlan.blockWeightSlots(c, columns: columns, extraRows: extra).count) + (32 << 20))
        XCTAssertEqual(kept.workspace, s(2 * CUDAMemoryPlan.blockWeightSlots(c, columns: columns).count) + (32 << 20))
    }

    /// Paged optimizer chunks: consecutive tensors while their 256-byte aligned regions fit one slot, in order, every
    /// tensor once; a region as large as the slot is a chunk alone.
    func testPagedChunks() {
        let regions = [1000, 300, 4000, 5000, 10, 5000, 256, 256]
        let chunks = CUDAOptimizer.pagedChunks(regions, slotBytes: 5000)
        XCTAssertEqual(chunks.map { $0.map(\.index) }, [[0, 1], [2], [3], [4], [5], [6, 7]])
        XCTAssertEqual(chunks.map { $0.map(\.offset) }, [[0, 1024], [0], [0], [0], [0], [0, 256]])
        for chunk in chunks {
            let end = chunk.last.map { $0.offset + regions[$0.index] } ?? 0
            XCTAssertLessThanOrEqual(end, 5000)
        }
        XCTAssertEqual(chunks.flatMap { $0.map(\.index) }, Array(regions.indices))
        // One region per chunk when every region is the slot's size; nothing for no tensors.
        XCTAssertEqual(CUDAOptimizer.pagedChunks([512, 512, 512], slotBytes: 512).count, 3)
        XCTAssertTrue(CUDAOptimizer.pagedChunks([], slotBytes: 512).isEmpty)
    }
}
