import XCTest
@testable import QLoRA

/// The backward's fold (LoRAFoldLayout.swift's LoRABackwardFold) and the paged optimizer's chunks, as the plan and the
/// GPU trainer size them; the GPU paths themselves are checked by qlora-gpu-check ("lora fold", "paged optimizer").
final class LoRABackwardFoldTests: XCTestCase {
    /// o_proj and down_proj fold (separate or Phi-3's fused projections), with the largest rank of the two as the
    /// residual gradient's spare columns (not under Gemma's sandwich norms); gate_proj and up_proj fold with theirs as
    /// gate's and up's (not Phi-3's fused gate_up_proj); nothing with the fold off.
    func testWhichLinearsFold() {
        let llama = Architecture.llama3_1_8b.config
        var ranks = Array(repeating: [16, 16, 16, 8, 16, 16, 4], count: llama.layerCount)
        ranks[3][3] = 32  // one block's o at a larger rank
        let fold = LoRABackwardFold(config: llama, ranks: ranks, enabled: true)
        XCTAssertEqual(fold.folds, [false, false, false, true, true, true, true])
        XCTAssertEqual(fold.extraRows, [0, 0, 0, 32, 16, 16, 4])
        XCTAssertEqual(fold.residualColumns, 32)
        XCTAssertEqual(fold.mlpColumns, 16)
        let off = LoRABackwardFold(config: llama, ranks: ranks, enabled: false)
        XCTAssertEqual(off.residualColumns, 0)
        XCTAssertEqual(off.mlpColumns, 0)
        XCTAssertEqual(off.extraRows, [0, 0, 0, 0, 0, 0, 0])
        let phi = Architecture.phi4_mini.config
        XCTAssertTrue(phi.fusedProjections)
        let fused = LoRABackwardFold(config: phi, ranks: Array(repeating: [16, 8, 16, 12], count: phi.layerCount), enabled: true)
        XCTAssertEqual(fused.folds, [false, true, false, true])
        XCTAssertEqual(fused.residualColumns, 12)
        XCTAssertEqual(fused.mlpColumns, 0, "Phi-3's gate_up_proj stays unfolded")
        let gemma = Architecture.gemma2_9b.config
        XCTAssertTrue(gemma.sandwichNorms)
        let sandwich = LoRABackwardFold(config: gemma, ranks: Array(repeating: Array(repeating: 16, count: 7), count: gemma.layerCount),
                                        enabled: true)
        XCTAssertEqual(sandwich.residualColumns, 0, "o's and down's dy is dNorm under sandwich norms: no fold")
        XCTAssertEqual(sandwich.folds, [false, false, false, false, true, true, false])
        XCTAssertEqual(sandwich.mlpColumns, 16)
        // No adapter on o or down: nothing to fold, no spare columns.
        let none = LoRABackwardFold(config: llama, ranks: Array(repeating: [16, 16, 16, 0, 16, 16, 0], count: llama.layerCount), enabled: true)
        XCTAssertEqual(none.residualColumns, 0)
        XCTAssertEqual(none.mlpColumns, 16)
    }

    /// The plan counts the fold's bytes: the residual gradient's R columns (2·N·R), gate's and up's R' (in the block
    /// scratch) and A's rows under o's, gate's, up's and down's W (one weight scratch: the largest; kept: every slot).
    func testPlanCountsTheBackwardFold() {
        let c = Architecture.llama3_1_8b.config, n = 4096, r = 16
        let s = DeviceAllocator.sizeClass
        var memory = CUDATrainerMemoryOptions.automatic(for: c)
        XCTAssertTrue(memory.foldLoRABackward, "on by default since session 10's H100 A/B")
        memory.foldLoRABackward = false
        let plain = CUDAMemoryPlan(config: c, tokens: n, rank: r, memory: memory)
        memory.foldLoRABackward = true
        let folded = CUDAMemoryPlan(config: c, tokens: n, rank: r, memory: memory)
        let scratch = BlockScratchLayout(config: c, tokens: n, foldedColumns: r)
        let foldedScratch = BlockScratchLayout(config: c, tokens: n, foldedColumns: r, gateColumns: r)
        XCTAssertEqual(foldedScratch.up - scratch.up, n * r, "gate's rows of I + r")
        XCTAssertEqual(folded.activations - plain.activations, s(2 * n * (c.hiddenSize + r)) - s(2 * n * c.hiddenSize)
                           + s(2 * foldedScratch.count) - s(2 * scratch.count))
        // The largest weight scratch: up [I (+ r), H + its folded tail] or down [H (+ r), I + r].
        let upK = c.hiddenSize + 2 * r, downK = c.intermediateSize + r
        XCTAssertEqual(plain.workspace, s(2 * max(c.intermediateSize * upK, c.hiddenSize * downK)) + (32 << 20))
        XCTAssertEqual(folded.workspace, s(2 * max((c.intermediateSize + r) * upK, (c.hiddenSize + r) * downK)) + (32 << 20))
        XCTAssertTrue("\(folded.memory)".contains("the LoRA backward folded"), "\(folded.memory)")
        // Kept block weights: o's and down's slots each r rows longer.
        memory.keepBlockWeights = true
        let keptFolded = CUDAMemoryPlan(config: c, tokens: n, rank: r, memory: memory)
        memory.foldLoRABackward = false
        let kept = CUDAMemoryPlan(config: c, tokens: n, rank: r, memory: memory)
        let columns = LoRAFoldLayout.widestK(c, ranks: Array(repeating: Array(repeating: r, count: 7), count: c.layerCount))
        let extra = [0, 0, 0, r, r, r, r]
        XCTAssertEqual(CUDAMemoryPlan.blockWeightSlots(c, columns: columns, extraRows: extra).count
                           - CUDAMemoryPlan.blockWeightSlots(c, columns: columns).count,
                       r * (columns[3] + columns[4] + columns[5] + columns[6]))
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
