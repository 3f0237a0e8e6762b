import XCTest
@testable import QLoRA

/// The GPU trainer's memory plan is computed on the host, so it is checked here without a GPU.
final class CUDAMemoryPlanTests: XCTestCase {
    func testPlanOfTheEightBillionShapeAddsUp() {
        let c = Architecture.llama3_1_8b.config
        let plan = CUDAMemoryPlan(config: c, tokens: 2 * 2048, rank: 16)
        // The default for this shape: checkpoints offloaded through 3 slots, the untied embedding on the host, no
        // kept masks or block weights, the attention outputs kept (offloaded), LoRA folded into the base GEMMs, and
        // (without dropout) into the backward's dx GEMMs.
        XCTAssertEqual(plan.memory, CUDATrainerMemoryOptions(offloadCheckpoints: true, checkpointSlots: 3, hostEmbedding: true,
                                                             keepDropoutMasks: false, keepBlockWeights: false,
                                                             keepAttentionOutputs: true, foldLoRA: true, foldLoRABackward: true))
        XCTAssertFalse(CUDAMemoryPlan(config: c, tokens: 2 * 2048, ranks: Array(repeating: Array(repeating: 16, count: 7), count: c.layerCount),
                                      dropout: true).memory.foldLoRABackward, "nothing folds its backward under dropout")
        // 4-bit weights of the 32 blocks: about half a byte per parameter plus the scales (~0.52 bytes).
        let linear = 32 * (c.hiddenSize * (c.qDim + 2 * c.kvDim) + c.qDim * c.hiddenSize + 3 * c.hiddenSize * c.intermediateSize)
        let head = 2 * c.vocabularySize * c.hiddenSize  // the head in bf16; the embedding is on the host
        XCTAssertGreaterThan(plan.weights, linear / 2 + head)
        XCTAssertLessThan(plan.weights, Int(Double(linear) * 0.53) + head + (64 << 20))
        // LoRA: 16 × (in + out) per projection; master + gradient fp32, bf16 copy: 10 bytes; AdamW: 8 bytes.
        let lora = 32 * 16 * (2 * c.hiddenSize + 2 * (c.hiddenSize + c.kvDim) + (c.qDim + c.hiddenSize) + 3 * (c.hiddenSize + c.intermediateSize))
        XCTAssertEqual(Double(plan.adapters), Double(10 * lora), accuracy: Double(10 * lora) * 0.02)
        XCTAssertEqual(Double(plan.optimizer), Double(8 * lora), accuracy: Double(8 * lora) * 0.02)
        // Checkpoints on the GPU: 3 slots of tokens × hidden in bf16.
        XCTAssertEqual(plan.checkpoints, 3 * 4096 * c.hiddenSize * 2)
        XCTAssertGreaterThan(plan.activations, plan.checkpoints)
        XCTAssertEqual(plan.total, plan.weights + plan.adapters + plan.optimizer + plan.activations + plan.workspace)
        // Measured on the H100 before offloading (docs/PERFORMANCE.md): the allocator's peak was 8.15 GiB with every
        // checkpoint and the embedding on the GPU, as the plan said then; 5.87 GiB with one weight's scratch (the
        // default of session 7), 0.3 GiB more keeping a block's dequantized weights; under Unsloth's 6.75 either way.
        // Session 8's kept attention outputs and folded LoRA: 5.90 / 5.89 measured each alone.
        XCTAssertEqual(Double(plan.total) / Double(1 << 30), 5.93, accuracy: 0.05)
        var keeping = plan.memory
        keeping.keepBlockWeights = true
        let kept = CUDAMemoryPlan(config: c, tokens: 2 * 2048, rank: 16, memory: keeping)
        XCTAssertEqual(Double(kept.total) / Double(1 << 30), 6.24, accuracy: 0.05)
        XCTAssertLessThan(Double(kept.total) / Double(1 << 30), 6.75)
    }

    /// Keeping a block's dequantized weights: one scratch per linear (8B: q, o 4096², k, v 1024 × 4096, gate, up,
    /// down 14336 × 4096, 436 MB in all) instead of the largest weight's (117 MB); under a budget that cannot hold
    /// them the plan drops back to one scratch, and the searches for the longest sequence and largest batch take
    /// that fallback (so they find what they found before). Unfolded weights (the folded ones' slots:
    /// testFoldedLoRALayoutAndItsBytes).
    func testKeptBlockWeightsAndTheFallback() {
        let c = Architecture.llama3_1_8b.config, n = 4096
        let s = DeviceAllocator.sizeClass
        let kept = CUDAMemoryPlan(config: c, tokens: n, rank: 16,
                                  memory: CUDATrainerMemoryOptions(offloadCheckpoints: true, hostEmbedding: true, keepBlockWeights: true,
                                                                   foldLoRA: false))
        XCTAssertTrue(kept.memory.keepBlockWeights)
        XCTAssertFalse(CUDAMemoryPlan(config: c, tokens: n, rank: 16).memory.keepBlockWeights, "off by default")
        let slots = CUDAMemoryPlan.blockWeightSlots(c)
        XCTAssertEqual(slots.offsets.count, 7)
        let elements = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096
        XCTAssertEqual(slots.count, elements)  // every shape is a multiple of 128 elements: no padding
        XCTAssertEqual(slots.offsets, [0, 4096 * 4096, 4096 * 4096 + 1024 * 4096, 4096 * 4096 + 2048 * 4096, 2 * 4096 * 4096 + 2048 * 4096,
                                       2 * 4096 * 4096 + 2048 * 4096 + 14336 * 4096, 2 * 4096 * 4096 + 2048 * 4096 + 2 * 14336 * 4096])
        XCTAssertEqual(kept.blockWeightBytes, s(2 * elements) - s(2 * 14336 * 4096))
        XCTAssertEqual(Double(2 * elements) / 1e6, 436.2, accuracy: 0.1)
        let again = CUDAMemoryPlan(config: c, tokens: n, rank: 16,
                                   memory: CUDATrainerMemoryOptions(offloadCheckpoints: true, hostEmbedding: true, keepBlockWeights: false,
                                                                    foldLoRA: false))
        XCTAssertEqual(again.blockWeightBytes, 0)
        XCTAssertEqual(kept.total - again.total, kept.blockWeightBytes)
        XCTAssertEqual(kept.withoutBlockWeights().total, again.total)
        XCTAssertEqual(kept.withoutBlockWeights().memory, again.memory)
        XCTAssertTrue("\(kept)".contains("kept for its backward"), "\(kept)")
        XCTAssertFalse("\(again)".contains("kept for its backward"), "\(again)")
        // A budget that holds the plan without the kept weights but not with them: the fallback.
        let context = CUDAMemoryPlan.typicalContextBytes, margin = CUDAMemoryPlan.safetyMarginBytes
        let tight = again.total + context + margin + kept.blockWeightBytes / 2
        XCTAssertFalse(kept.fits(budgetBytes: tight))
        XCTAssertEqual(kept.fitting(budgetBytes: tight).total, again.total)
        XCTAssertFalse(kept.fitting(budgetBytes: tight).memory.keepBlockWeights)
        let roomy = kept.total + context + margin
        XCTAssertTrue(kept.fitting(budgetBytes: roomy).memory.keepBlockWeights)
        XCTAssertEqual(kept.fitting(budgetBytes: roomy).total, kept.total)
        // The longest sequence on a 24 GiB card is the same whether the weights may be kept or not.
        let budget = 24 << 30
        XCTAssertEqual(CUDAMemoryPlan.longestSequence(config: c, batch: 1, rank: 16, memory: kept.memory, budgetBytes: budget),
                       CUDAMemoryPlan.longestSequence(config: c, batch: 1, rank: 16, memory: again.memory, budgetBytes: budget))
        XCTAssertEqual(CUDAMemoryPlan.largestBatch(config: c, sequenceLength: 2048, rank: 16, memory: kept.memory, budgetBytes: budget),
                       CUDAMemoryPlan.largestBatch(config: c, sequenceLength: 2048, rank: 16, memory: again.memory, budgetBytes: budget))
        // Phi-3's fused projections: four slots, qkv [q + 2kv, H] first.
        let phi = Architecture.allCases.map(\.config).first { $0.fusedProjections }
        if let phi {
            let fused = CUDAMemoryPlan.blockWeightSlots(phi)
            XCTAssertEqual(fused.offsets.count, 4)
            XCTAssertEqual(fused.offsets[1], ((phi.qDim + 2 * phi.kvDim) * phi.hiddenSize + 127) / 128 * 128)
        }
    }

    /// Offloading keeps `checkpointSlots` [N, H] buffers of the L + 1 on the GPU and L + 1 − slots in pinned host
    /// memory; the host embedding moves the [V, H] table off the GPU and adds an [N, H] staging buffer on the host.
    func testOffloadedCheckpointsAndHostEmbeddingMoveTheirBytesToTheHost() {
        let c = Architecture.llama3_1_8b.config, n = 4096
        let s = DeviceAllocator.sizeClass
        let checkpoint = 2 * n * c.hiddenSize, table = 2 * c.vocabularySize * c.hiddenSize
        let device = CUDAMemoryPlan(config: c, tokens: n, rank: 16, memory: .allOnDevice)
        XCTAssertEqual(device.checkpoints, 33 * s(checkpoint))
        XCTAssertEqual(device.host, 0)
        let offload = CUDAMemoryPlan(config: c, tokens: n, rank: 16,
                                     memory: CUDATrainerMemoryOptions(offloadCheckpoints: true, hostEmbedding: false))
        XCTAssertEqual(device.total - offload.total, 30 * s(checkpoint))
        XCTAssertEqual(offload.weights, device.weights)
        XCTAssertEqual(offload.host, 30 * checkpoint)
        let two = CUDAMemoryPlan(config: c, tokens: n, rank: 16,
                                 memory: CUDATrainerMemoryOptions(offloadCheckpoints: true, checkpointSlots: 2, hostEmbedding: false))
        XCTAssertEqual(device.total - two.total, 31 * s(checkpoint))
        XCTAssertEqual(two.host, 31 * checkpoint)
        let both = CUDAMemoryPlan(config: c, tokens: n, rank: 16,
                                  memory: CUDATrainerMemoryOptions(offloadCheckpoints: true, hostEmbedding: true))
        XCTAssertEqual(device.total - both.total, 30 * s(checkpoint) + s(table))
        XCTAssertEqual(device.weights - both.weights, s(table))
        XCTAssertEqual(both.host, 30 * checkpoint + table + checkpoint)
        // The 8B shape, 2 × 2048: about 1.94 GiB less on the GPU.
        XCTAssertEqual(Double(device.total - both.total) / Double(1 << 30), 1.94, accuracy: 0.01)
    }

    /// Kept attention outputs: with offloaded checkpoints one more o and lse slot on the GPU and every block but the
    /// last two on the host; without, every block's own on the GPU.
    func testKeptAttentionOutputs() {
        let c = Architecture.llama3_1_8b.config, n = 4096
        let s = DeviceAllocator.sizeClass
        let o = 2 * n * c.qDim, lse = 4 * n * c.headCount
        let offload = CUDATrainerMemoryOptions(offloadCheckpoints: true, hostEmbedding: false)
        var kept = offload
        kept.keepAttentionOutputs = true
        let plain = CUDAMemoryPlan(config: c, tokens: n, rank: 16, memory: offload)
        let keeping = CUDAMemoryPlan(config: c, tokens: n, rank: 16, memory: kept)
        XCTAssertEqual(keeping.total - plain.total, s(o) + s(lse))
        XCTAssertEqual(keeping.host - plain.host, 30 * (o + lse))
        XCTAssertTrue(keeping.description.contains("attention outputs kept (offloaded)"), keeping.description)
        var onDevice = CUDATrainerMemoryOptions.allOnDevice
        onDevice.keepAttentionOutputs = true
        let device = CUDAMemoryPlan(config: c, tokens: n, rank: 16, memory: .allOnDevice)
        let deviceKept = CUDAMemoryPlan(config: c, tokens: n, rank: 16, memory: onDevice)
        XCTAssertEqual(deviceKept.total - device.total, 31 * (s(o) + s(lse)))
        XCTAssertEqual(deviceKept.host, 0)
        XCTAssertTrue(CUDATrainerMemoryOptions.automatic(for: c).keepAttentionOutputs, "on with offloaded checkpoints")
    }

    /// The fitting rule drops the kept attention outputs last, only where the plan does not fit with them.
    func testFittingDropsKeptAttentionOutputsWhereTheyDoNotFit() {
        let c = Architecture.llama3_1_8b.config
        let plan = CUDAMemoryPlan(config: c, tokens: 65_536, rank: 16)
        XCTAssertTrue(plan.memory.keepAttentionOutputs)
        var off = plan.memory
        off.keepAttentionOutputs = false
        let without = plan.replanned(memory: off)
        var budget = 1 << 30
        while !without.fits(budgetBytes: budget) { budget += 16 << 20 }
        XCTAssertFalse(plan.fits(budgetBytes: budget), "the slot (512 MiB at 65,536 tokens) must not fit in 16 MiB")
        let fitted = plan.fitting(budgetBytes: budget)
        XCTAssertFalse(fitted.memory.keepAttentionOutputs)
        XCTAssertEqual(fitted.total, without.total)
        XCTAssertTrue(plan.fitting(budgetBytes: 80 << 30).memory.keepAttentionOutputs)
        // Where the host would not hold the pinned copies (the trainer passes three quarters of the machine's RAM).
        XCTAssertFalse(plan.fitting(budgetBytes: 80 << 30, hostBytes: without.host).memory.keepAttentionOutputs)
        XCTAssertTrue(plan.fitting(budgetBytes: 80 << 30, hostBytes: plan.host).memory.keepAttentionOutputs)
        XCTAssertGreaterThan(HostMemory.physicalBytes ?? 0, 1 << 30)
    }

    /// A tied embedding stays on the GPU (the head reads it) whatever the options say; with no more checkpoints
    /// than slots nothing is offloaded, and the automatic choice leaves offloading off.
    func testTiedEmbeddingsAndShallowModelsStayOnTheGPU() {
        let tied = Architecture.llama3_2_1b.config
        XCTAssertTrue(tied.tieWordEmbeddings)
        XCTAssertFalse(CUDATrainerMemoryOptions.automatic(for: tied).hostEmbedding)
        let forced = CUDAMemoryPlan(config: tied, tokens: 8192, rank: 16,
                                    memory: CUDATrainerMemoryOptions(offloadCheckpoints: true, hostEmbedding: true))
        XCTAssertFalse(forced.memory.hostEmbedding)
        XCTAssertEqual(forced.host, 14 * 2 * 8192 * tied.hiddenSize)  // 17 checkpoints, 3 of them in GPU slots
        var shallow = Architecture.smollm2_135m.config
        shallow.layerCount = 2
        XCTAssertFalse(CUDATrainerMemoryOptions.automatic(for: shallow).offloadCheckpoints)
        let on = CUDAMemoryPlan(config: shallow, tokens: 512, rank: 8,
                                memory: CUDATrainerMemoryOptions(offloadCheckpoints: true, hostEmbedding: false))
        let off = CUDAMemoryPlan(config: shallow, tokens: 512, rank: 8, memory: .allOnDevice)
        XCTAssertEqual(on.total, off.total)
        XCTAssertEqual(on.host, 0)
    }

    /// The attention backward's dA, dq, dk, dv and fp32 dQ accumulator fit in the region the MLP's gate, up and activated use, for every
    /// architecture; the buffers of each phase do not overlap and start on 256-byte boundaries.
    func testBlockScratchSharesTheMLPRegion() {
        for arch in Architecture.allCases {
            let c = arch.config, n = 4 * 2048
            let layout = BlockScratchLayout(config: c, tokens: n)
            let mlp = [(layout.gate, n * c.intermediateSize), (layout.up, n * c.intermediateSize), (layout.activated, n * c.intermediateSize)]
            let attention = [(layout.dAttended, n * c.qDim), (layout.dq, n * c.qDim), (layout.dk, n * c.kvDim), (layout.dv, n * c.kvDim),
                             (layout.dqAccumulator, 2 * n * c.qDim)]  // fp32 dQ in bf16 elements
            for phase in [mlp, attention] {
                for (i, (start, count)) in phase.enumerated() {
                    XCTAssertEqual(start % 128, 0, arch.rawValue)
                    XCTAssertLessThanOrEqual(start + count, layout.count, arch.rawValue)
                    if i > 0 { XCTAssertGreaterThanOrEqual(start, phase[i - 1].0 + phase[i - 1].1, arch.rawValue) }
                }
            }
            XCTAssertEqual(layout.count, 3 * n * c.intermediateSize, "\(arch.rawValue): the attention gradients and logits fit in the MLP's region")
        }
        // A model whose attention is wider than its MLP: the region grows to hold the attention gradients.
        var wide = Architecture.smollm2_135m.config
        wide.intermediateSize = 64
        let layout = BlockScratchLayout(config: wide, tokens: 100)
        XCTAssertGreaterThanOrEqual(layout.count, layout.dv + 100 * wide.kvDim)
    }

    func testOutOfMemoryMessageShowsThePlanAndWhatToLower() {
        let plan = CUDAMemoryPlan(config: Architecture.llama3_1_8b.config, tokens: 64 * 8192, rank: 16)
        let text = "\(CUDAOutOfMemoryError(plan: plan, freeBytes: 80 << 30, detail: "checked before allocating"))"
        for part in ["weights", "adapters", "optimizer", "activations", "workspace", "host", "--batch", "--seq", "LoRA rank"] {
            XCTAssertTrue(text.contains(part), "'\(part)' missing from: \(text)")
        }
        XCTAssertFalse(text.contains("offload the gradient checkpoints"), "already offloaded: \(text)")
        let onDevice = CUDAMemoryPlan(config: Architecture.llama3_1_8b.config, tokens: 64 * 8192, rank: 16, memory: .allOnDevice)
        let advice = "\(CUDAOutOfMemoryError(plan: onDevice, freeBytes: 80 << 30, detail: "checked before allocating"))"
        XCTAssertTrue(advice.contains("offload the gradient checkpoints"), advice)
    }

    /// The kept dropout masks' layout: one [tokens, ⌈in/8⌉] region per adapter (none for rank 0), in block and linear
    /// order, each on a 256-byte boundary, none overlapping.
    func testKeptDropoutMaskLayout() {
        let shapes: [(out: Int, in: Int)] = [(8, 9), (4, 1000), (5, 64)]
        let ranks = [[2, 0, 3], [0, 0, 1]]
        let n = 7
        let layout = CUDAMemoryPlan.keptMaskLayout(tokens: n, shapes: shapes, ranks: ranks)
        // 7 · 2 = 14 → 256; 7 · 8 = 56 → 256; then 256.
        XCTAssertEqual(layout.offsets.map { $0.map { $0 ?? -1 } }, [[0, -1, 256], [-1, -1, 512]])
        XCTAssertEqual(layout.bytes, 768)
        XCTAssertEqual(CUDAContext.loraDropoutMaskBytes(tokens: n, inFeatures: 9), 14)
        XCTAssertEqual(CUDAMemoryPlan.keptMaskLayout(tokens: 4096, shapes: shapes, ranks: [[16, 16, 16]]).offsets[0],
                       [0, 8192, 8192 + 4096 * 125])
    }

    /// LoRA dropout adds the fused kernels' fp32 dA scratch (token splits x rank x in of the largest linear), every
    /// block's own d(x)·Aᵀ, and the mask bits: every block's (kept from the forward, `--keep-dropout-masks on`: 1/16 of the
    /// adapters' inputs), or one linear's (hashed again by the backward), then together less than half a [tokens,
    /// largest in] copy of d(x); per-projection ranks size the adapters per linear.
    func testDropoutScratchAndPerProjectionRanks() {
        let c = Architecture.llama3_1_8b.config, n = 4096
        // Like for like: without dropout the plan folds the backward's LoRA product (its buffers), with dropout it cannot.
        var unfolded = CUDATrainerMemoryOptions.automatic(for: c)
        unfolded.foldLoRABackward = false
        var keepingOptions = unfolded
        keepingOptions.keepDropoutMasks = true
        let plain = CUDAMemoryPlan(config: c, tokens: n, rank: 16, memory: unfolded)
        let dropout = CUDAMemoryPlan(config: c, tokens: n, rank: 16, dropout: true, memory: keepingOptions)
        XCTAssertFalse(CUDAMemoryPlan(config: c, tokens: n, rank: 16, dropout: true).memory.keepDropoutMasks, "off by default")
        // down_proj (in 14336, 56 blocks of 256 columns) takes 7 token splits, the others (in 4096) 24: 7·16·14336 floats.
        XCTAssertEqual(CUDAContext.loraDropoutSplits(tokens: n, inFeatures: c.intermediateSize), 7)
        XCTAssertEqual(CUDAContext.loraDropoutSplits(tokens: n, inFeatures: c.hiddenSize), 24)
        XCTAssertEqual(CUDAContext.loraDropoutMaskBytes(tokens: n, inFeatures: c.intermediateSize), n * 14336 / 8)
        XCTAssertEqual(CUDAContext.loraDropoutMaskBytes(tokens: 3, inFeatures: 9), 6)  // rows of ⌈9/8⌉ bytes
        let s = DeviceAllocator.sizeClass
        let scratch = s(4 * 7 * 16 * c.intermediateSize), droppedXA = c.layerCount * 7 * s(2 * n * 16)
        XCTAssertTrue(dropout.memory.keepDropoutMasks)
        let keptBits = c.layerCount * (6 * n * c.hiddenSize + n * c.intermediateSize) / 8
        XCTAssertEqual(dropout.activations - plain.activations, scratch + s(keptBits) + droppedXA)
        // 59% of a checkpoint per block at this shape (38,912 input columns of the seven adapters against 4096 · 16 bits).
        XCTAssertLessThan(keptBits, c.layerCount * 2 * n * c.hiddenSize * 6 / 10)
        var rehashingOptions = unfolded
        rehashingOptions.keepDropoutMasks = false
        let rehashing = CUDAMemoryPlan(config: c, tokens: n, rank: 16, dropout: true, memory: rehashingOptions)
        XCTAssertEqual(rehashing.activations - plain.activations, scratch + s(n * c.intermediateSize / 8) + droppedXA)
        XCTAssertLessThan(rehashing.activations - plain.activations, 2 * n * c.intermediateSize / 2)
        // Without dropout the option changes nothing.
        XCTAssertEqual(CUDAMemoryPlan(config: c, tokens: n, rank: 16, memory: rehashingOptions).total, plain.total)
        // Fewer tokens never need more splits (a trainer's scratch, sized at its capacity, fits every batch).
        for tokens in [1, 100, 1000, 2048, 4095] {
            XCTAssertLessThanOrEqual(CUDAContext.loraDropoutSplits(tokens: tokens, inFeatures: c.hiddenSize),
                                     CUDAContext.loraDropoutSplits(tokens: n, inFeatures: c.hiddenSize))
        }
        // x·Aᵀ is kept for one block only (shared): one [n, largest rank of the linear] buffer per projection.
        // Rank 8 instead of 16 saves 7 of those buffers' halves, plus dy·B's.
        let narrow = CUDAMemoryPlan(config: c, tokens: n, rank: 8, memory: unfolded)
        XCTAssertEqual(plain.activations - narrow.activations, 8 * (s(2 * n * 16) - s(2 * n * 8)))
        XCTAssertEqual(dropout.total - plain.total, dropout.activations - plain.activations)
        let same = CUDAMemoryPlan(config: c, tokens: n, ranks: Array(repeating: Array(repeating: 16, count: 7), count: c.layerCount), memory: unfolded)
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

    /// The folded LoRA (LoRAFoldLayout): where each x·Aᵀ sits after its input's row, each product's K, and exactly
    /// what the plan adds for it (norm1 and norm2 rows of H + 3r and H + 2r, activated rows of I + r, each weight
    /// scratch rows of its widest K).
    func testFoldedLoRALayoutAndItsBytes() {
        let c = Architecture.llama3_1_8b.config, n = 4096, h = c.hiddenSize, i = c.intermediateSize
        let layout = LoRAFoldLayout(config: c, ranks: Array(repeating: 16, count: 7))
        XCTAssertEqual(layout.tailStart, [0, 16, 32, nil, 0, 16, 0])
        XCTAssertEqual(layout.inputStride, [h + 48, h + 48, h + 48, c.qDim, h + 32, h + 32, i + 16])
        XCTAssertEqual(layout.groupColumns, [48, 32, 16])
        XCTAssertEqual((0..<7).map { layout.foldedK($0, in: CUDAMemoryPlan.linearShapes(c)[$0].in, rank: 16) },
                       [h + 16, h + 32, h + 48, c.qDim, h + 16, h + 32, i + 16])
        // Adapters on some projections: k (rank 0) takes no columns but reads norm1's rows as they are; gate none.
        let gaps = LoRAFoldLayout(config: c, ranks: [8, 0, 4, 8, 0, 8, 0])
        XCTAssertEqual(gaps.tailStart, [0, nil, 8, nil, nil, 0, nil])
        XCTAssertEqual(gaps.groupColumns, [12, 8, 0])
        XCTAssertEqual(gaps.inputStride, [h + 12, h + 12, h + 12, c.qDim, h + 8, h + 8, i])
        XCTAssertEqual(gaps.foldedK(1, in: h, rank: 0), h)
        // The buffers are sized by the widest block.
        XCTAssertEqual(LoRAFoldLayout.widestColumns(c, ranks: [[8, 0, 4, 8, 0, 8, 0], Array(repeating: 16, count: 7)]), [48, 32, 16])
        XCTAssertEqual(LoRAFoldLayout.widestK(c, ranks: [[8, 0, 4, 8, 0, 8, 0], [4, 4, 4, 4, 4, 4, 4]]),
                       [h + 8, h + 8, h + 12, c.qDim, h + 4, h + 8, i + 4])
        // Phi-3's fused projections: qkv, gate_up and down each alone.
        if let phi = Architecture.allCases.map(\.config).first(where: { $0.fusedProjections }) {
            let fused = LoRAFoldLayout(config: phi, ranks: [16, 16, 16, 16])
            XCTAssertEqual(fused.tailStart, [0, nil, 0, 0])
            XCTAssertEqual(fused.groupColumns, [16, 16, 16])
        }
        // The plan with and without: exactly the wider buffers.
        let s = DeviceAllocator.sizeClass
        var off = CUDATrainerMemoryOptions.automatic(for: c)
        XCTAssertTrue(off.foldLoRA, "on by default")
        off.foldLoRABackward = false  // the forward's fold alone here (LoRABackwardFoldTests counts the backward's)
        let on = off
        off.foldLoRA = false
        let folded = CUDAMemoryPlan(config: c, tokens: n, rank: 16, memory: on), plain = CUDAMemoryPlan(config: c, tokens: n, rank: 16, memory: off)
        XCTAssertTrue(folded.memory.foldLoRA)
        XCTAssertTrue("\(folded)".contains("LoRA folded"), "\(folded)")
        XCTAssertFalse("\(plain)".contains("LoRA folded"), "\(plain)")
        let scratch = s(2 * BlockScratchLayout(config: c, tokens: n, foldedColumns: 16).count) - s(2 * BlockScratchLayout(config: c, tokens: n).count)
        XCTAssertEqual(BlockScratchLayout(config: c, tokens: n, foldedColumns: 16).activated + n * (i + 16),
                       BlockScratchLayout(config: c, tokens: n, foldedColumns: 16).count)
        XCTAssertEqual(folded.activations - plain.activations,
                       s(2 * n * (h + 48)) - s(2 * n * h) + s(2 * n * (h + 32)) - s(2 * n * h) + scratch)
        // One weight's scratch: gate's rows of H + 32 (14336 × 4128) are the largest.
        XCTAssertEqual(folded.workspace - plain.workspace, s(2 * i * (h + 32)) - s(2 * i * h))
        XCTAssertEqual(folded.weights, plain.weights)
        // Kept block weights: every slot with its folded rows.
        var keeping = off
        keeping.keepBlockWeights = true
        var keepingFolded = keeping
        keepingFolded.foldLoRA = true
        let keptPlain = CUDAMemoryPlan(config: c, tokens: n, rank: 16, memory: keeping)
        let keptFolded = CUDAMemoryPlan(config: c, tokens: n, rank: 16, memory: keepingFolded)
        let widths = LoRAFoldLayout.widestK(c, ranks: Array(repeating: Array(repeating: 16, count: 7), count: c.layerCount))
        XCTAssertEqual(CUDAMemoryPlan.blockWeightSlots(c, columns: widths).count,
                       zip(CUDAMemoryPlan.linearShapes(c), widths).map { ($0.0.out * $0.1 + 127) / 128 * 128 }.reduce(0, +))
        XCTAssertEqual(keptFolded.blockWeightBytes, s(2 * CUDAMemoryPlan.blockWeightSlots(c, columns: widths).count) - s(2 * i * (h + 32)))
        XCTAssertEqual(keptFolded.workspace - keptPlain.workspace,
                       s(2 * CUDAMemoryPlan.blockWeightSlots(c, columns: widths).count) - s(2 * CUDAMemoryPlan.blockWeightSlots(c).count))
        // 1.7 MB of wider rows on the 8B shape at 2 × 2048; the allocator's size classes round norm1, norm2 and the
        // weight scratch up to their next class: 16 MiB.
        XCTAssertEqual(folded.total - plain.total, (4 + 4 + 8) << 20)
    }

    /// The loss chunk's logits live in the block's shared region: as many rows as the MLP's region holds, at most
    /// 256 MiB of logits, at least 512 rows (the region grows only then), a multiple of 64 unless it is every token.
    func testLossChunksShareTheBlockRegion() {
        for arch in Architecture.allCases {
            let c = arch.config
            for n in [2 * 2048, 4 * 2048, 64] {
                let layout = BlockScratchLayout(config: c, tokens: n)
                let rows = layout.lossChunkRows
                // 256 MiB unless the 512-row floor is more (Gemma 3's 262,208 words: 512 rows are 256.06 MiB).
                XCTAssertLessThanOrEqual(rows * c.vocabularySize * 2, max(256 << 20, 512 * c.vocabularySize * 2), arch.rawValue)
                XCTAssertLessThanOrEqual(rows * c.vocabularySize, layout.count, arch.rawValue)
                XCTAssertTrue(rows % 64 == 0 || rows == n, arch.rawValue)
                XCTAssertGreaterThanOrEqual(rows, min(512, n), arch.rawValue)
                if rows > 512 { XCTAssertEqual(layout.count, 3 * n * c.intermediateSize, "\(arch.rawValue): the logits cost nothing") }
            }
        }
        // The benchmark workloads: SmolLM2 fits 768 rows in its MLP region; the 128K vocabularies keep 1024-row chunks.
        XCTAssertEqual(BlockScratchLayout(config: Architecture.smollm2_135m.config, tokens: 8192).lossChunkRows, 768)
        XCTAssertEqual(BlockScratchLayout(config: Architecture.llama3_2_1b.config, tokens: 8192).lossChunkRows, 1024)
        XCTAssertEqual(BlockScratchLayout(config: Architecture.llama3_1_8b.config, tokens: 4096).lossChunkRows, 1024)
        var tiny = Architecture.smollm2_135m.config
        tiny.vocabularySize = 1000
        XCTAssertEqual(BlockScratchLayout(config: tiny, tokens: 40).lossChunkRows, 40)
    }

    /// What fits a card: the longest sequence and the largest batch are the last that fit (one step more does not),
    /// offloading the checkpoints lets more fit, and the 70B shape's weights alone are over 24 GB.
    func testLongestSequenceAndLargestBatchAreTheLastThatFit() throws {
        let c = Architecture.llama3_1_8b.config
        let gib24 = 24 << 30
        for offload in [true, false] {
            var memory = CUDATrainerMemoryOptions.automatic(for: c)
            memory.offloadCheckpoints = offload
            // As the trainer does: without room for a block's dequantized weights, the plan without them.
            func fits(_ tokens: Int) -> Bool {
                CUDAMemoryPlan(config: c, tokens: tokens, rank: 16, memory: memory).fitting(budgetBytes: gib24).fits(budgetBytes: gib24)
            }
            let longest = try XCTUnwrap(CUDAMemoryPlan.longestSequence(config: c, batch: 1, rank: 16, memory: memory, budgetBytes: gib24))
            XCTAssertTrue(fits(longest))
            XCTAssertFalse(fits(longest + 256))
            let batch = CUDAMemoryPlan.largestBatch(config: c, sequenceLength: 2048, rank: 16, memory: memory, budgetBytes: gib24)
            XCTAssertTrue(fits(batch * 2048))
            XCTAssertFalse(fits((batch + 1) * 2048))
        }
        var onGPU = CUDATrainerMemoryOptions.automatic(for: c)
        onGPU.offloadCheckpoints = false
        XCTAssertGreaterThan(CUDAMemoryPlan.longestSequence(config: c, batch: 1, rank: 16, memory: nil, budgetBytes: gib24)!,
                             CUDAMemoryPlan.longestSequence(config: c, batch: 1, rank: 16, memory: onGPU, budgetBytes: gib24)!)
        XCTAssertNil(CUDAMemoryPlan.longestSequence(config: Architecture.llama3_1_70b.config, batch: 1, rank: 16, memory: nil,
                                                    budgetBytes: gib24))
        XCTAssertEqual(CUDAMemoryPlan.largestBatch(config: Architecture.llama3_1_70b.config, sequenceLength: 2048, rank: 16, memory: nil,
                                                   budgetBytes: gib24), 0)
    }

    // MARK: Optimizer state, the savers' one rule, dropout in the searches

    /// ZeRO-2 adapters (`adaptersShardedOver`, what the GPU engine does with --shard-adapters): the optimizer state is that
    /// of the rank holding the most (AdapterOwnership over the A and B tensors in the trainer's order), for every kind;
    /// besides it only the adapters change (each rank's masters, gradients and buckets:
    /// OwnedAdapterMastersTests.testPlanCountsEachRanksMastersGradientsAndBuckets), and over several ranks the fold,
    /// so the rest is compared with the unsharded plan without the fold; a world of one has the unsharded optimizer
    /// state, and the trainer's own AdamW (no kind) is the unsharded plan.
    /// By hand: the 8B shape's 32 identical blocks split 16 and 16 over two ranks, so adamw's moments and the paged
    /// state on the host halve exactly, while the paged kinds' two device slots (the largest tensor's) stay.
    func testShardedAdaptersCountEachRanksOptimizerState() {
        let c = Architecture.llama3_1_8b.config
        let shapes = CUDAMemoryPlan.linearShapes(c)
        let tensors = (0..<c.layerCount).flatMap { _ in shapes.flatMap { [16 * $0.in, $0.out * 16] } }
        var noFold = CUDATrainerMemoryOptions.automatic(for: c)
        noFold.foldLoRA = false
        for kind in [OptimizerKind.adamw, .adamw8bit, .pagedAdamw8bit, .pagedAdamw32bit] {
            let whole = CUDAMemoryPlan(config: c, tokens: 2048, rank: 16, optimizer: kind)
            let wholeNoFold = whole.replanned(memory: noFold)
            let one = CUDAMemoryPlan(config: c, tokens: 2048, rank: 16, optimizer: kind, adaptersShardedOver: 1)
            XCTAssertEqual(one.optimizer, whole.optimizer)
            XCTAssertEqual(one.optimizerHost, whole.optimizerHost)
            XCTAssertEqual(one.adapterShardedWorld, 1)
            for world in [2, 3, 4] {
                let plan = CUDAMemoryPlan(config: c, tokens: 2048, rank: 16, optimizer: kind, adaptersShardedOver: world)
                let ownership = AdapterOwnership(counts: tensors, worldSize: world)
                let perRank = ownership.ranges.map { CUDAMemoryPlan.optimizerBytes(kind, tensors: Array(tensors[$0]), flatCount: 0) }
                XCTAssertEqual(plan.optimizer, perRank.map(\.device).max(), "\(kind) over \(world)")
                XCTAssertEqual(plan.optimizerHost, perRank.map(\.host).max(), "\(kind) over \(world)")
                XCTAssertEqual(plan.adapterShardedWorld, world)
                XCTAssertEqual(plan.total - plan.optimizer - plan.adapters, wholeNoFold.total - wholeNoFold.optimizer - wholeNoFold.adapters,
                               "only the optimizer state and the adapters change (and the fold is off)")
                XCTAssertLessThan(plan.adapters, whole.adapters)
                XCTAssertEqual(plan.host - plan.optimizerHost, whole.host - whole.optimizerHost)
                XCTAssertTrue("\(plan)".contains("(\(kind.rawValue), this rank's LoRA tensors of \(world)"), "\(plan)")
            }
            let two = CUDAMemoryPlan(config: c, tokens: 2048, rank: 16, optimizer: kind, adaptersShardedOver: 2)
            switch kind {
            case .adamw, .adamw8bit:
                // adamw_8bit's two code maps are on each rank: half of the regions, plus the maps.
                let maps = kind == .adamw8bit ? 2 * DeviceAllocator.sizeClass(4 * 256) : 0
                XCTAssertEqual(2 * (two.optimizer - maps), whole.optimizer - maps, "\(kind): half the state a rank")
            case .pagedAdamw8bit, .pagedAdamw32bit:
                XCTAssertEqual(two.optimizer, whole.optimizer, "\(kind): the two slots of the largest tensor stay")
                XCTAssertEqual(2 * two.optimizerHost, whole.optimizerHost, "\(kind): half the pinned state a rank")
            }
        }
        // The trainer's own fp32 AdamW (no kind) is never sharded.
        let own = CUDAMemoryPlan(config: c, tokens: 2048, rank: 16, adaptersShardedOver: 2)
        XCTAssertEqual(own.optimizer, CUDAMemoryPlan(config: c, tokens: 2048, rank: 16).optimizer)
        XCTAssertEqual(own.adapterShardedWorld, 1)
        // replanned keeps the sharding unless told otherwise.
        let paged = CUDAMemoryPlan(config: c, tokens: 2048, rank: 16, optimizer: .pagedAdamw8bit, adaptersShardedOver: 2)
        XCTAssertEqual(paged.replanned(optimizer: .some(.adamw)).adapterShardedWorld, 2)
        XCTAssertEqual(paged.replanned(adaptersShardedOver: .some(nil)).optimizerHost, 2 * paged.optimizerHost)
    }

    /// The optimizer state counted as CUDAOptimizer allocates it, by kind: one region per LoRA tensor (A [r, in] and
    /// B [out, r] of each linear); the paged kinds hold only two slots of the largest tensor's region on the GPU (the
    /// state streams through them) and the rest in pinned host memory. 70B, r 16: paged_adamw_8bit saves the 1.63 GiB of fp32 moments.
    func testOptimizerStateByKind() throws {
        let c = Architecture.llama3_1_70b.config, n = 4096, r = 16
        let s = DeviceAllocator.sizeClass
        let shapes = CUDAMemoryPlan.linearShapes(c)
        let tensors = (0..<c.layerCount).flatMap { _ in shapes.flatMap { [r * $0.in, $0.out * r] } }
        let parameters = tensors.reduce(0, +)
        XCTAssertEqual(parameters, 80 * 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672)))
        func eightBit(_ n: Int) -> Int { n < 4096 ? 8 * n : (2 * n + 15) / 16 * 16 + 8 * ((n + 255) / 256) }
        let own = CUDAMemoryPlan(config: c, tokens: n, rank: r)
        XCTAssertNil(own.optimizerKind)
        XCTAssertEqual(own.optimizer, 2 * s(4 * parameters), "the trainer's own AdamW: two fp32 moments over the flat buffers")
        let adamw = CUDAMemoryPlan(config: c, tokens: n, rank: r, optimizer: .adamw)
        XCTAssertEqual(adamw.optimizer, tensors.reduce(0) { $0 + s(8 * $1) })
        XCTAssertEqual(adamw.optimizerHost, 0)
        let bnb = CUDAMemoryPlan(config: c, tokens: n, rank: r, optimizer: .adamw8bit)
        XCTAssertEqual(bnb.optimizer, tensors.reduce(0) { $0 + s(eightBit($1)) } + 2 * s(1024), "8-bit regions and the two code maps")
        let paged = CUDAMemoryPlan(config: c, tokens: n, rank: r, optimizer: .pagedAdamw8bit)
        // down_proj's A [16, 28672] and gate/up's B [28672, 16] are the largest: 458,752 values, 931,840 bytes of state.
        XCTAssertEqual(eightBit(458_752), 931_840)
        XCTAssertEqual(paged.optimizer, 2 * s(931_840) + 2 * s(1024))
        XCTAssertEqual(paged.optimizerHost, tensors.reduce(0) { $0 + eightBit($1) })
        XCTAssertEqual(paged.host - own.host, paged.optimizerHost, "the paged state is host memory")
        let paged32 = CUDAMemoryPlan(config: c, tokens: n, rank: r, optimizer: .pagedAdamw32bit)
        XCTAssertEqual(paged32.optimizer, 2 * s(8 * 458_752))
        XCTAssertEqual(paged32.optimizerHost, 8 * parameters)
        for plan in [adamw, bnb, paged, paged32] {
            XCTAssertEqual(plan.total - plan.optimizer, own.total - own.optimizer, "only the optimizer's bytes change")
        }
        XCTAssertEqual(Double(own.optimizer - paged.optimizer) / Double(1 << 30), 1.63, accuracy: 0.01)
        XCTAssertTrue("\(paged)".contains("(paged_adamw_8bit: state ") && "\(paged)".contains("in pinned host memory"), "\(paged)")
        XCTAssertEqual(paged.replanned(optimizer: .some(nil)).optimizer, own.optimizer)
        // Tensors under 4096 values keep fp32 state in the 8-bit kinds: on the tiny fixture at rank 1, all of them.
        let tiny = try DecoderConfig(directory: TestFixtures.path("tiny-llama/base"))
        let small = CUDAMemoryPlan(config: tiny, tokens: 64, rank: 1, optimizer: .adamw8bit)
        let smallTensors = (0..<tiny.layerCount).flatMap { _ in CUDAMemoryPlan.linearShapes(tiny).flatMap { [$0.in, $0.out] } }
        XCTAssertTrue(smallTensors.allSatisfy { $0 < 4096 })
        XCTAssertEqual(small.optimizer, smallTensors.reduce(0) { $0 + s(8 * $1) }, "no 8-bit tensor: no code maps either")
    }

    /// `fitting` drops the optional savers in one order: a block's kept weights first, then every block's kept
    /// dropout masks; without dropout the masks cost nothing and are left as asked.
    func testFittingDropsKeptWeightsThenKeptMasks() {
        let c = Architecture.llama3_1_8b.config, n = 4096
        func plan(weights: Bool, masks: Bool, dropout: Bool = true) -> CUDAMemoryPlan {
            CUDAMemoryPlan(config: c, tokens: n, rank: 16, dropout: dropout,
                           memory: CUDATrainerMemoryOptions(offloadCheckpoints: true, hostEmbedding: true, keepDropoutMasks: masks,
                                                            keepBlockWeights: weights))
        }
        let both = plan(weights: true, masks: true), masksOnly = plan(weights: false, masks: true), neither = plan(weights: false, masks: false)
        XCTAssertGreaterThan(both.total, masksOnly.total)
        XCTAssertGreaterThan(masksOnly.total, neither.total)
        let overhead = CUDAMemoryPlan.typicalContextBytes + CUDAMemoryPlan.safetyMarginBytes
        let roomy = both.fitting(budgetBytes: both.total + overhead)
        XCTAssertTrue(roomy.memory.keepBlockWeights && roomy.memory.keepDropoutMasks)
        let first = both.fitting(budgetBytes: masksOnly.total + overhead)
        XCTAssertFalse(first.memory.keepBlockWeights)
        XCTAssertTrue(first.memory.keepDropoutMasks, "the kept weights go first")
        XCTAssertEqual(first.total, masksOnly.total)
        let second = both.fitting(budgetBytes: masksOnly.total + overhead - 1)
        XCTAssertFalse(second.memory.keepBlockWeights || second.memory.keepDropoutMasks)
        XCTAssertEqual(second.total, neither.total)
        XCTAssertEqual(masksOnly.withoutKeptDropoutMasks().total, neither.total)
        // Nothing fits: both savers dropped, the plan as small as it gets (the caller reports it).
        XCTAssertEqual(both.fitting(budgetBytes: 1 << 30).total, neither.total)
        let dry = plan(weights: true, masks: true, dropout: false)
        let dryFitted = dry.fitting(budgetBytes: 1 << 30)
        XCTAssertFalse(dryFitted.memory.keepBlockWeights)
        XCTAssertTrue(dryFitted.memory.keepDropoutMasks, "no dropout: nothing to drop")
        XCTAssertEqual(dryFitted.total, plan(weights: false, masks: false, dropout: false).total)
    }

    /// The searches count LoRA dropout's buffers (`qlora train` defaults to dropout 0.05) and the optimizer's state.
    func testSearchesCountDropoutAndTheOptimizer() throws {
        let c = Architecture.llama3_1_8b.config
        let gib24 = 24 << 30
        let memory = CUDATrainerMemoryOptions.automatic(for: c)
        func fits(_ tokens: Int, dropout: Bool, optimizer: OptimizerKind?) -> Bool {
            CUDAMemoryPlan(config: c, tokens: tokens, rank: 16, dropout: dropout, memory: memory, optimizer: optimizer)
                .fitting(budgetBytes: gib24).fits(budgetBytes: gib24)
        }
        let plain = try XCTUnwrap(CUDAMemoryPlan.longestSequence(config: c, batch: 1, rank: 16, memory: memory, budgetBytes: gib24))
        let dropped = try XCTUnwrap(CUDAMemoryPlan.longestSequence(config: c, batch: 1, rank: 16, memory: memory, budgetBytes: gib24,
                                                                   dropout: true))
        XCTAssertLessThan(dropped, plain, "dropout's d(x)·Aᵀ of every block, mask bits and scratch take room")
        XCTAssertTrue(fits(dropped, dropout: true, optimizer: nil))
        XCTAssertFalse(fits(dropped + 256, dropout: true, optimizer: nil))
        let paged = try XCTUnwrap(CUDAMemoryPlan.longestSequence(config: c, batch: 1, rank: 16, memory: memory, budgetBytes: gib24,
                                                                 dropout: true, optimizer: .pagedAdamw8bit))
        // The paged state leaves the GPU (0.31 GiB here; the longest sequence moves only when that crosses one of the
        // allocator's size classes, which grow in steps at these sizes).
        XCTAssertGreaterThanOrEqual(paged, dropped)
        let fp32 = CUDAMemoryPlan(config: c, tokens: dropped, rank: 16, dropout: true, memory: memory)
        let eightBit = CUDAMemoryPlan(config: c, tokens: dropped, rank: 16, dropout: true, memory: memory, optimizer: .pagedAdamw8bit)
        XCTAssertEqual(fp32.total - eightBit.total, fp32.optimizer - eightBit.optimizer)
        XCTAssertGreaterThan(fp32.optimizer - eightBit.optimizer, 300 << 20)
        XCTAssertTrue(fits(paged, dropout: true, optimizer: .pagedAdamw8bit))
        XCTAssertFalse(fits(paged + 256, dropout: true, optimizer: .pagedAdamw8bit))
        let batch = CUDAMemoryPlan.largestBatch(config: c, sequenceLength: 2048, rank: 16, memory: memory, budgetBytes: gib24,
                                                dropout: true, optimizer: .pagedAdamw8bit)
        XCTAssertTrue(fits(batch * 2048, dropout: true, optimizer: .pagedAdamw8bit))
        XCTAssertFalse(fits((batch + 1) * 2048, dropout: true, optimizer: .pagedAdamw8bit))
    }
}
