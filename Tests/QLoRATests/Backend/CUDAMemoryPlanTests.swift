import XCTest
@testable import QLoRA

/// The GPU trainer's memory plan is computed on the host, so it is checked here without a GPU.
final class CUDAMemoryPlanTests: XCTestCase {
    func testPlanOfTheEightBillionShapeAddsUp() {
        let c = Architecture.llama3_1_8b.config
        let plan = CUDAMemoryPlan(config: c, tokens: 2 * 2048, rank: 16)
        // 4-bit weights of the 32 blocks: about half a byte per parameter plus the scales (~0.52 bytes).
        let linear = 32 * (c.hiddenSize * (c.qDim + 2 * c.kvDim) + c.qDim * c.hiddenSize + 3 * c.hiddenSize * c.intermediateSize)
        let tables = 2 * 2 * c.vocabularySize * c.hiddenSize  // embedding and head in bf16, untied
        XCTAssertGreaterThan(plan.weights, linear / 2 + tables)
        XCTAssertLessThan(plan.weights, Int(Double(linear) * 0.53) + tables + (64 << 20))
        // LoRA: 16 × (in + out) per projection; master + gradient fp32, bf16 copy: 10 bytes; AdamW: 8 bytes.
        let lora = 32 * 16 * (2 * c.hiddenSize + 2 * (c.hiddenSize + c.kvDim) + (c.qDim + c.hiddenSize) + 3 * (c.hiddenSize + c.intermediateSize))
        XCTAssertEqual(Double(plan.adapters), Double(10 * lora), accuracy: Double(10 * lora) * 0.02)
        XCTAssertEqual(Double(plan.optimizer), Double(8 * lora), accuracy: Double(8 * lora) * 0.02)
        // Checkpoints alone: 33 × tokens × hidden in bf16.
        XCTAssertGreaterThan(plan.activations, 33 * 4096 * c.hiddenSize * 2)
        XCTAssertEqual(plan.total, plan.weights + plan.adapters + plan.optimizer + plan.activations + plan.workspace)
        // Measured on the H100 (docs/PERFORMANCE.md): the allocator's peak was 8.15 GiB for this workload.
        XCTAssertEqual(Double(plan.total) / Double(1 << 30), 8.15, accuracy: 0.2)
    }

    func testOutOfMemoryMessageShowsThePlanAndWhatToLower() {
        let plan = CUDAMemoryPlan(config: Architecture.llama3_1_8b.config, tokens: 64 * 8192, rank: 16)
        let text = "\(CUDAOutOfMemoryError(plan: plan, freeBytes: 80 << 30, detail: "checked before allocating"))"
        for part in ["weights", "adapters", "optimizer", "activations", "workspace", "--batch", "--seq", "LoRA rank"] {
            XCTAssertTrue(text.contains(part), "'\(part)' missing from: \(text)")
        }
    }

    /// LoRA dropout adds one [tokens, largest in] bf16 scratch; per-projection ranks size the adapters per linear.
    func testDropoutScratchAndPerProjectionRanks() {
        let c = Architecture.llama3_1_8b.config, n = 4096
        let plain = CUDAMemoryPlan(config: c, tokens: n, rank: 16)
        let dropout = CUDAMemoryPlan(config: c, tokens: n, rank: 16, dropout: true)
        XCTAssertEqual(dropout.activations - plain.activations, DeviceAllocator.sizeClass(2 * n * c.intermediateSize))
        XCTAssertEqual(dropout.total - plain.total, dropout.activations - plain.activations)
        let same = CUDAMemoryPlan(config: c, tokens: n, ranks: Array(repeating: Array(repeating: 16, count: 7), count: c.layerCount))
        XCTAssertEqual(same.total, plain.total)
        // Rank 32 on down_proj only: its (hidden + intermediate) × 16 more parameters per block.
        let ranks = Array(repeating: [16, 16, 16, 16, 16, 16, 32], count: c.layerCount)
        let wider = CUDAMemoryPlan(config: c, tokens: n, ranks: ranks)
        let lora = 32 * 16 * (2 * c.hiddenSize + 2 * (c.hiddenSize + c.kvDim) + (c.qDim + c.hiddenSize) + 3 * (c.hiddenSize + c.intermediateSize))
        let extra = c.layerCount * 16 * (c.hiddenSize + c.intermediateSize)
        // The allocator's size classes round each buffer up, so: at least the bytes, at most 1/3 more.
        XCTAssertGreaterThanOrEqual(wider.optimizer, 8 * (lora + extra))
        XCTAssertLessThan(Double(wider.optimizer), Double(8 * (lora + extra)) * 4 / 3)
        XCTAssertGreaterThan(wider.activations, plain.activations)
    }

    func testLossChunksStayUnder256MiBOfLogits() {
        for arch in Architecture.allCases {
            let c = arch.config
            let rows = CUDAMemoryPlan.lossChunkRows(vocab: c.vocabularySize, tokens: 8192)
            XCTAssertLessThanOrEqual(rows * c.vocabularySize * 2, 256 << 20, arch.rawValue)
            XCTAssertEqual(rows % 64, 0, arch.rawValue)
        }
        XCTAssertEqual(CUDAMemoryPlan.lossChunkRows(vocab: 1000, tokens: 40), 40)
    }
}
