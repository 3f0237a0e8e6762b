#if canImport(Glibc)
import Glibc
#endif

// Batched generation on the GPU: many sequences decoded together, each 4-bit weight read once per step for all of
// them (continuous batching: a sequence that ends frees its KV-cache slot, and the next waiting prompt takes it).
//
// The weights are a `CUDAInference`'s (NF4 + double quant base, bf16 norms, embedding and head, LoRA unmerged);
// this class adds a KV cache per slot ([slots, rows, kvDim] bf16 per layer: rows = capacity, or min(window, capacity) on
// a sliding layer, a ring with position p at row p mod rows) and step buffers. A step feeds rows, each one token of one
// sequence with its own slot and position (decode_batched.cu's header): a decode step one row per running sequence, a
// prefill step all prompt tokens of the sequences it admits, packed (the same kernels: RoPE and the cache append per
// row, then each row's query attends to its own slot up to its own position). A sequence's rows in a step are one run
// (consecutive rows, consecutive positions, continuing what its slot holds); on a ring layer the run's keys are read
// from its rows and its last `window` rows appended after the attention (CUDAInference's header says why).
// The forward of a step is the CPU model's (Model/DecoderModel.swift) with bf16 activations:
//   x = embed(tokens) [· √hidden]; per layer: q|k|v = RMSNorm(x)·Wqkvᵀ (+ bias) (+ LoRA); [q/k norm;] RoPE; append k, v;
//   attention [soft-capped, windowed]; x += [norm](o-proj); g|u = RMSNorm(x)·Wguᵀ (+ LoRA); x += [norm](down(act(g)·u));
//   logits = RMSNorm(x_last)·headᵀ (fp32) [soft-capped], with every variation as CUDAInference computes it (its header).
// longrope: each run rotates with the short factors while its sequence is at most original_max_position_embeddings
// long, else with the long ones (the frequency table holds both; a flag per row picks). A sequence whose cache was
// rotated with the short factors and grows past that length must be fed again from position 0 (as transformers and
// batch-1 generation recompute it): BatchScheduler does so, and a step that would continue it is refused.
// The projections of a group (q|k|v, o, gate|up, down) write one fused row per token. Base products: steps of at
// most `fusedRowLimit` rows run nf4_gemm_rows (the tensor-core NF4 small-GEMM, 64 rows per pass), larger steps
// dequantize each matrix into a bf16 scratch and multiply with cuBLASLt. LoRA, unmerged, for the whole group in two
// cuBLASLt GEMMs: xa = X·A_stackedᵀ [rows, Σr], then Y += scale·xa·B_diagᵀ with B_diag the group's B matrices on a
// block diagonal [Σ out, Σr] (made once), so every matrix's term lands in its columns of the fused row.
// Picking: greedy takes each row's argmax on the GPU (4 bytes per sequence come back); sampling brings the rows'
// logits back and each sequence samples with its own generator (Generation/ContinuousBatching.swift).

/// A projection group laid out for batched steps.
struct BatchedProjection {
    let group: ProjectionGroup
    /// Columns of the fused output row (the matrices' rows together).
    let columns: Int
    /// The group's B matrices on a block diagonal, [columns, Σr] bf16 (times each matrix's scale over `loraScale` when
    /// the scales differ); nil without LoRA.
    let loraB: DeviceBuffer<UInt16>?
    let loraScale: Float
    /// The fused GEMM's tasks for each chunk of 64 rows (chunk c's outputs start 64·c rows further), device copies.
    var chunkTasks: [DeviceBuffer<UInt8>] = []
    var splits = 1

    var rank: Int { group.totalRank }
}

public final class CUDABatchedInference: BatchedSession {
    public let context: CUDAContext
    public let config: DecoderConfig
    /// The weights (shared with its batch-1 path).
    public let weights: CUDAInference
    /// Sequences decoded together at most.
    public let slots: Int
    /// Positions per slot (prompt + answer).
    public let capacity: Int
    /// Rows a step holds at most (prefill packs prompts up to this many tokens).
    public let maxRows: Int
    /// Steps of at most this many rows use the fused NF4 small-GEMM (in passes of 64 rows); larger ones dequantize
    /// each weight and use cuBLASLt. 0: always cuBLASLt.
    public var fusedRowLimit = 256
    /// K splits of the fused GEMM for every group (0: chosen per group for the card's multiprocessors).
    public private(set) var forcedSplits = 0
    /// Prompt tokens one prefill step packs at most.
    public let prefillTokens: Int

    var projections: [[BatchedProjection]] = []  // per layer: qkv, o, gateUp, down
    /// Per layer: the KV-cache rows of a slot, `capacity` or min(window, capacity) on a sliding layer (a ring).
    public let layerRows: [Int]
    let keys: [DeviceBuffer<UInt16>]             // per layer [slots, layerRows[l], kvDim]
    let values: [DeviceBuffer<UInt16>]
    /// Per slot: the positions its cache holds and whether their keys were rotated with longrope's long factors.
    var slotLengths: [Int]
    var slotUsesLongFactors: [Bool]
    // Step buffers.
    let stepInput: DeviceBuffer<Int32>           // [tokens | slots | positions | logit rows | run starts | run ends | long], maxRows each
    let x: DeviceBuffer<UInt16>                  // [maxRows, hidden]
    let normed: DeviceBuffer<UInt16>
    let qkv: DeviceBuffer<UInt16>                // [maxRows, qDim + 2 kvDim]
    let attended: DeviceBuffer<UInt16>           // [maxRows, qDim]
    let gateUp: DeviceBuffer<UInt16>             // [maxRows, 2 intermediate]
    let hidden: DeviceBuffer<UInt16>             // [maxRows, intermediate]
    let projected: DeviceBuffer<UInt16>          // [maxRows, hidden] with sandwich norms (o, down before their norm), else x
    /// Per RoPE of the model (weights.ropes): its inverse frequencies, [short | long] with longrope, else [short].
    let ropeFrequencies: [DeviceBuffer<Float>]
    let xa: DeviceBuffer<UInt16>                 // [maxRows, max Σr]
    let lastRows: DeviceBuffer<UInt16>           // [slots, hidden]
    let lastNormed: DeviceBuffer<UInt16>
    let logits: DeviceBuffer<Float>              // [slots, vocab]
    let picks: DeviceBuffer<Int32>               // [slots]
    let packedX: DeviceBuffer<UInt8>
    var partial: DeviceBuffer<Float>
    /// The dequantized weight of the cuBLASLt path (the largest group), made on first use.
    var scratch: DeviceBuffer<UInt16>?

    /// Batched generation with `weights`' model: `slots` sequences at once, each up to `capacity` positions.
    /// `prefillTokens` bounds the prompt tokens one prefill step packs (a longer prompt still runs, alone, when it
    /// fits `capacity`).
    public init(weights: CUDAInference, slots: Int, capacity: Int, prefillTokens: Int = 2048) throws {
        let c = weights.config
        guard slots > 0 else { throw UsageError("batched generation needs at least one sequence slot, got \(slots)") }
        guard capacity > 0, capacity <= c.maxPositionEmbeddings else {
            throw UsageError("a KV cache of \(capacity) positions does not fit the model's \(c.maxPositionEmbeddings)")
        }
        try c.checkCUDASupport(what: "a KV cache of \(capacity) positions")
        guard prefillTokens > 0 else { throw UsageError("the prefill token budget must be positive, got \(prefillTokens)") }
        context = weights.context
        config = c
        self.weights = weights
        self.slots = slots
        self.capacity = capacity
        self.prefillTokens = prefillTokens
        maxRows = max(slots, prefillTokens, capacity)
        let A = context.allocator
        let h = c.hiddenSize, inter = c.intermediateSize, qkvDim = c.qDim + 2 * c.kvDim
        layerRows = c.layerAttention.map { $0.cacheRows(capacity: capacity) }
        keys = try layerRows.map { try A.buffer(UInt16.self, count: slots * $0 * c.kvDim) }
        values = try layerRows.map { try A.buffer(UInt16.self, count: slots * $0 * c.kvDim) }
        slotLengths = Array(repeating: 0, count: slots)
        slotUsesLongFactors = Array(repeating: false, count: slots)
        stepInput = try A.buffer(Int32.self, count: 7 * maxRows)
        x = try A.buffer(UInt16.self, count: maxRows * h)
        normed = try A.buffer(UInt16.self, count: maxRows * max(h, c.qDim))
        qkv = try A.buffer(UInt16.self, count: maxRows * qkvDim)
        attended = try A.buffer(UInt16.self, count: maxRows * c.qDim)
        gateUp = try A.buffer(UInt16.self, count: maxRows * 2 * inter)
        hidden = try A.buffer(UInt16.self, count: maxRows * inter)
        projected = c.sandwichNorms ? try A.buffer(UInt16.self, count: maxRows * h) : x
        ropeFrequencies = try weights.ropes.map { rope in
            let short = c.ropeInverseFrequencies(rope.parameters).map { Float($0) }
            let long = rope.parameters.scaling.kind == .longrope ? c.ropeInverseFrequencies(rope.parameters, long: true).map { Float($0) } : []
            return try A.buffer(copying: short + long)
        }
        let maxRank = weights.layers.flatMap { [$0.qkv, $0.o, $0.gateUp, $0.down] }.map(\.totalRank).max() ?? 0
        xa = try A.buffer(UInt16.self, count: maxRows * max(maxRank, 1))
        lastRows = try A.buffer(UInt16.self, count: slots * h)
        lastNormed = try A.buffer(UInt16.self, count: slots * h)
        logits = try A.buffer(Float.self, count: slots * c.vocabularySize)
        picks = try A.buffer(Int32.self, count: slots)
        packedX = try A.buffer(UInt8.self, count: NF4GemmTask.packedBytes(rows: NF4GemmTask.maxRows, cols: max(h, c.qDim, inter)))
        partial = try A.buffer(Float.self, count: 1)
        for layer in weights.layers {
            projections.append(try [layer.qkv, layer.o, layer.gateUp, layer.down].map { try Self.batched($0, context: context) })
        }
        try makeTasks()
        _ = try context.compiler.module(KernelSources.decodeBatched)
    }

    /// Uploads `model` (as `CUDAInference` does, NF4 + double quant, LoRA unmerged) for batched generation.
    public convenience init(context: CUDAContext, model: DecoderModel, slots: Int, capacity: Int, prefillTokens: Int = 2048,
                            quantized: [String: QuantizedWeight] = [:]) throws {
        try self.init(weights: CUDAInference(context: context, model: model, capacity: 1, quantized: quantized), slots: slots,
                      capacity: capacity, prefillTokens: prefillTokens)
    }

    /// The group's block-diagonal LoRA B (see the file header).
    static func batched(_ g: ProjectionGroup, context: CUDAContext) throws -> BatchedProjection {
        let columns = g.matrices.reduce(0) { $0 + $1.rows }
        let ranks = g.lora.compactMap { $0 }
        guard g.loraA != nil, let first = ranks.first else {
            return BatchedProjection(group: g, columns: columns, loraB: nil, loraScale: 0)
        }
        let sameScale = ranks.allSatisfy { $0.scale == first.scale }
        let total = g.totalRank
        let diag = try context.allocator.buffer(UInt16.self, count: columns * total)
        try diag.fill(byte: 0)
        var row0 = 0
        for (m, matrix) in g.matrices.enumerated() {
            if let lora = g.lora[m] {
                var b = lora.b
                if !sameScale {  // fold scale / first.scale into a scaled copy
                    let dtype = context.computeDType
                    let host = try lora.b.download().map { dtype.encode(dtype.decode($0) * lora.scale / first.scale) }
                    b = try context.allocator.buffer(copying: host)
                }
                try context.copyBlock(b.pointer, to: diag.address(at: row0 * total), rows: matrix.rows, cols: lora.rank, dstStride: total,
                                      dstColumn: lora.offset)
            }
            row0 += matrix.rows
        }
        return BatchedProjection(group: g, columns: columns, loraB: diag, loraScale: first.scale)
    }

    /// Runs the fused GEMM of every group with `splits` K splits (0: chosen per group), e.g. to check both epilogues.
    public func forceSplits(_ splits: Int) throws {
        guard splits >= 0 else { throw UsageError("K splits must be 0 (automatic) or positive, got \(splits)") }
        forcedSplits = splits
        try makeTasks()
    }

    /// The fused GEMM's encoded tasks per 64-row chunk (outputs at fixed step buffers) and the split-K partials.
    func makeTasks() throws {
        let c = config, A = context.allocator
        let chunks = (maxRows + NF4GemmTask.maxRows - 1) / NF4GemmTask.maxRows
        var partialCount = 1
        for l in projections.indices {
            for (k, var p) in projections[l].enumerated() {
                // Outputs: q|k|v and gate|up into their fused rows, o and down onto the residual stream x (into
                // `projected` for a sandwich norm to add).
                let (out, stride) = output(k)
                let accumulate = (k == 1 || k == 3) && !c.sandwichNorms
                let hasBias = !p.group.biases.isEmpty
                let (_, blocks, _) = NF4GemmTask.encode(tasks(p, out: out.pointer, stride: stride, accumulate: accumulate || hasBias))
                p.splits = forcedSplits > 0 ? forcedSplits
                    : NF4GemmTask.splits(blocks: blocks, cols: p.group.columns, sms: context.device.multiprocessorCount)
                p.chunkTasks = try (0..<chunks).map { chunk in
                    let base = out.address(at: chunk * NF4GemmTask.maxRows * stride)
                    return try A.buffer(copying: NF4GemmTask.encode(tasks(p, out: base, stride: stride, accumulate: accumulate || hasBias)).bytes)
                }
                if p.splits > 1 { partialCount = max(partialCount, p.splits * NF4GemmTask.maxRows * p.columns) }
                projections[l][k] = p
            }
        }
        if partial.count < partialCount { partial = try A.buffer(Float.self, count: partialCount) }
    }

    /// Where group k (q|k|v, o, gate|up, down) writes, with the row stride.
    func output(_ k: Int) -> (DeviceBuffer<UInt16>, Int) {
        let c = config
        switch k {
        case 0: return (qkv, c.qDim + 2 * c.kvDim)
        case 2: return (gateUp, 2 * c.intermediateSize)
        default: return (c.sandwichNorms ? projected : x, c.hiddenSize)
        }
    }

    func tasks(_ p: BatchedProjection, out: CUdeviceptr, stride: Int, accumulate: Bool) -> [NF4GemmTask] {
        var column = 0
        return p.group.matrices.map { m in
            defer { column += m.rows }
            return NF4GemmTask(weight: m, out: out + UInt64(column * 2), outStride: stride, accumulate: accumulate)
        }
    }

    // MARK: Steps

    /// Runs `rows` through the model (appending each row's k and v to its slot) and leaves the logits of the rows
    /// listed in `logitRows` (indices into `rows`, at most `slots`) in `logits`, [logitRows.count, vocab].
    public func step(_ rows: [BatchRow], logitRows: [Int]) throws {
        let c = config, ctx = context
        let r = rows.count, h = c.hiddenSize, inter = c.intermediateSize, qkvDim = c.qDim + 2 * c.kvDim
        // Checked here, before anything indexes a cache with them.
        for (i, row) in rows.enumerated() {
            guard row.slot >= 0, row.slot < slots, row.position >= 0, row.position < capacity, row.token >= 0,
                  row.token < c.vocabularySize else {
                throw UsageError("step row \(i) (token \(row.token), slot \(row.slot), position \(row.position)) is outside the vocabulary (\(c.vocabularySize)), the \(slots) slots or their \(capacity) positions")
            }
        }
        guard r > 0, r <= maxRows, logitRows.count <= slots, logitRows.allSatisfy({ rows.indices.contains($0) }) else {
            throw UsageError("a step of \(r) rows (1...\(maxRows)) keeping \(logitRows.count) logit rows (at most \(slots), each one of the step's)")
        }
        var input = [Int32](repeating: 0, count: 7 * maxRows)
        for (i, row) in rows.enumerated() {
            input[i] = Int32(row.token)
            input[maxRows + i] = Int32(row.slot)
            input[2 * maxRows + i] = Int32(row.position)
        }
        for (i, index) in logitRows.enumerated() { input[3 * maxRows + i] = Int32(index) }
        // Runs: each sequence's rows, consecutive at consecutive positions, continuing its slot (position 0 starts it anew).
        var lengths = slotLengths, long = slotUsesLongFactors, seen = Set<Int>()
        var i = 0
        while i < r {
            var j = i + 1
            while j < r && rows[j].slot == rows[i].slot && rows[j].position == rows[j - 1].position + 1 { j += 1 }
            let slot = rows[i].slot, first = rows[i].position, end = rows[j - 1].position + 1
            guard seen.insert(slot).inserted else {
                throw UsageError("step row \(i): slot \(slot) has two runs in one step (its rows must be consecutive, at consecutive positions)")
            }
            guard first == 0 || first == slotLengths[slot] else {
                throw UsageError("step row \(i): position \(first) of slot \(slot), whose cache holds \(slotLengths[slot]) positions")
            }
            let usesLong = c.usesLongRopeFactors(sequenceLength: end)
            if first > 0 && usesLong != slotUsesLongFactors[slot] {
                throw UsageError("step row \(i): slot \(slot) passes longrope's original_max_position_embeddings (\(c.ropeScaling.originalMaxPositionEmbeddings)) at position \(end - 1); its keys were rotated with the short factors, so its sequence must be fed again from position 0 (BatchScheduler does)")
            }
            lengths[slot] = end
            long[slot] = usesLong
            for k in i..<j {
                input[4 * maxRows + k] = Int32(i)
                input[5 * maxRows + k] = Int32(j)
                input[6 * maxRows + k] = usesLong ? 1 : 0
            }
            i = j
        }
        try stepInput.upload(Array(input[0..<(3 * maxRows + logitRows.count)]))
        try stepInput.view(at: 4 * maxRows, count: 2 * maxRows + r).upload(Array(input[(4 * maxRows)..<(6 * maxRows + r)]))
        let tokens = stepInput.pointer, slotIDs = stepInput.address(at: maxRows), positions = stepInput.address(at: 2 * maxRows)
        let runStart = stepInput.address(at: 4 * maxRows), runEnd = stepInput.address(at: 5 * maxRows)
        let longRows = c.ropeScaling.kind == .longrope ? stepInput.address(at: 6 * maxRows) : 0
        let fused = r <= fusedRowLimit

        try ctx.embeddingRows(ids: tokens, table: weights.embedding.pointer, out: x.pointer, rows: r, dim: h, scale: weights.embeddingScale)
        let offset = c.normWeightOffset
        func norm(_ input: DeviceBuffer<UInt16>, _ weight: DeviceBuffer<UInt16>, rows: Int, into out: DeviceBuffer<UInt16>) throws {
            try ctx.rmsNormRows(x: input.pointer, weight: weight.pointer, out: out.pointer, rows: rows, dim: h, eps: c.rmsNormEps, offset: offset)
        }
        /// x += Gemma's sandwich norm of `projected` (o's or down's output); nothing without one (they added onto x).
        func sandwich(_ weight: DeviceBuffer<UInt16>?) throws {
            guard let weight else { return }
            try ctx.rmsNormRows(x: projected.pointer, weight: weight.pointer, out: x.pointer, rows: r, dim: h, eps: c.rmsNormEps,
                                offset: offset, add: true)
        }
        let residualOut = c.sandwichNorms ? projected : x
        for (l, layer) in weights.layers.enumerated() {
            let p = projections[l]
            try norm(x, layer.inputNorm, rows: r, into: normed)
            try project(p[0], input: normed.pointer, rows: r, out: qkv, stride: qkvDim, accumulate: false, fused: fused)
            let rope = weights.ropeOfLayer[l]
            // A ring layer appends after its attention (the header).
            let ring = layerRows[l] < capacity
            try ctx.ropeAppendRows(qkv: qkv.pointer, stride: qkvDim, kcache: ring ? 0 : keys[l].pointer, vcache: ring ? 0 : values[l].pointer,
                                   slots: slotIDs, positions: positions, inverseFrequencies: ropeFrequencies[rope].pointer, rows: r,
                                   capacity: layerRows[l], heads: c.headCount, kvHeads: c.kvHeadCount, headDim: c.headDim,
                                   rotaryDim: c.rotaryDim, ropeScale: weights.ropes[rope].scale, qNorm: layer.qNorm?.pointer ?? 0,
                                   kNorm: layer.kNorm?.pointer ?? 0, normOffset: offset, eps: c.rmsNormEps, longRows: longRows)
            try ctx.attentionRows(qkv: qkv.pointer, stride: qkvDim, kcache: keys[l].pointer, vcache: values[l].pointer, out: attended.pointer,
                                  slots: slotIDs, positions: positions, rows: r, capacity: layerRows[l], heads: c.headCount,
                                  kvHeads: c.kvHeadCount, headDim: c.headDim, scale: c.attentionScale, softcap: c.attentionSoftcap ?? 0,
                                  window: weights.windows[l], runStart: ring ? runStart : 0)
            if ring {
                try ctx.kvAppendRows(qkv: qkv.pointer, stride: qkvDim, kcache: keys[l].pointer, vcache: values[l].pointer, slots: slotIDs,
                                     positions: positions, runEnd: runEnd, rows: r, capacity: layerRows[l], heads: c.headCount,
                                     kvHeads: c.kvHeadCount, headDim: c.headDim)
            }
            try project(p[1], input: attended.pointer, rows: r, out: residualOut, stride: h, accumulate: !c.sandwichNorms, fused: fused)
            try sandwich(layer.attentionOutputNorm)
            try norm(x, layer.postNorm, rows: r, into: normed)
            try project(p[2], input: normed.pointer, rows: r, out: gateUp, stride: 2 * inter, accumulate: false, fused: fused)
            try ctx.swigluRows(gateUp: gateUp.pointer, into: hidden.pointer, rows: r, inter: inter, activation: c.mlpActivation)
            try project(p[3], input: hidden.pointer, rows: r, out: residualOut, stride: h, accumulate: !c.sandwichNorms, fused: fused)
            try sandwich(layer.mlpOutputNorm)
        }
        slotLengths = lengths
        slotUsesLongFactors = long
        guard !logitRows.isEmpty else { return }
        let l = logitRows.count
        try ctx.gatherRows(src: x.pointer, dst: lastRows.pointer, index: stepInput.address(at: 3 * maxRows), rows: l, cols: h)
        try norm(lastRows, weights.finalNorm, rows: l, into: lastNormed)
        try ctx.blas().gemm(m: l, n: c.vocabularySize, k: h, a: lastNormed.pointer, b: weights.head.pointer, transB: true,
                            c: logits.pointer, outputType: .float32)
        if let cap = c.finalLogitSoftcap { try ctx.softcapLogits(logits.pointer, count: l * c.vocabularySize, cap: cap) }
    }

    /// out[:, group columns] (= or += when `accumulate`) input · Wᵀ (+ bias) (+ LoRA) for the group's fused row
    /// (`stride` values per row; `out` is that row's start).
    func project(_ p: BatchedProjection, input: CUdeviceptr, rows r: Int, out: DeviceBuffer<UInt16>, stride: Int, accumulate: Bool,
                 fused: Bool) throws {
        let ctx = context, g = p.group, cols = g.columns
        let hasBias = !g.biases.isEmpty
        if hasBias {  // biases first; the products then add onto them
            var column = 0
            for (m, matrix) in g.matrices.enumerated() {
                if g.bias(m) != nil || !accumulate {
                    try ctx.addBiasRows(g.bias(m)?.pointer ?? 0, to: out.address(at: column), stride: stride, rows: r, cols: matrix.rows,
                                        overwrite: !accumulate)
                }
                column += matrix.rows
            }
        }
        if fused {
            let tasks = self.tasks(p, out: out.pointer, stride: stride, accumulate: accumulate || hasBias)
            var chunk = 0
            while chunk * NF4GemmTask.maxRows < r {
                let first = chunk * NF4GemmTask.maxRows, count = min(NF4GemmTask.maxRows, r - first)
                try ctx.nf4GemmRows(tasks: tasks, encodedTasks: p.chunkTasks[chunk].pointer, x: input + UInt64(first * cols * 2), rows: count,
                                    cols: cols, packedX: packedX.pointer, splits: p.splits, partial: partial.pointer)
                chunk += 1
            }
        } else {
            let blas = try ctx.blas()
            let largest = projections.flatMap { $0 }.map { $0.columns * $0.group.columns }.max() ?? 1
            if scratch == nil { scratch = try ctx.allocator.buffer(UInt16.self, count: largest) }
            let w = scratch!
            var row0 = 0
            for matrix in g.matrices {
                try ctx.dequantize(matrix, into: w.view(at: row0 * cols, count: matrix.count))
                row0 += matrix.rows
            }
            // [r, columns] = input [r, cols] · W_groupᵀ; the fused row is dense ([r, stride] with stride = columns).
            try blas.gemm(m: r, n: p.columns, k: cols, a: input, b: w.pointer, transB: true, c: out.pointer,
                          beta: accumulate || hasBias ? 1 : 0)
        }
        if let a = g.loraA, let b = p.loraB {
            let blas = try ctx.blas()
            try blas.gemm(m: r, n: p.rank, k: cols, a: input, b: a.pointer, transB: true, c: xa.pointer)
            try blas.gemm(m: r, n: p.columns, k: p.rank, a: xa.pointer, b: b.pointer, transB: true, c: out.pointer, alpha: p.loraScale, beta: 1)
        }
    }

    /// Bytes of the KV caches (every slot, every layer): `DecoderConfig.kvCacheBytes(capacity:slots:)`.
    public var kvCacheBytes: Int { zip(keys, values).reduce(0) { $0 + $1.0.byteCount + $1.1.byteCount } }

    // MARK: Generation

    /// Answers `prompts` through `BatchScheduler` (continuous batching over this session's slots), prompt i with
    /// `sampling[i]`.
    public func generate(prompts: [[Int]], sampling: [SamplingOptions], maxTokens: Int, stopIDs: Set<Int>,
                         onAnswer: (Int, GenerationResult) -> Void = { _, _ in }) throws -> BatchedAnswers {
        try BatchScheduler.generate(session: self, prompts: prompts, sampling: sampling, maxTokens: maxTokens, stopIDs: stopIDs,
                                    onAnswer: onAnswer)
    }

    public func greedyTokens(count: Int) throws -> [Int] {
        try context.argmaxRows(logits: logits.pointer, out: picks.pointer, rows: count, vocab: config.vocabularySize)
        return try picks.view(at: 0, count: count).download().map { Int($0) }
    }

    public func keptLogits(count: Int) throws -> [Float] {
        try logits.view(at: 0, count: count * config.vocabularySize).download()
    }

    /// Logits of a step for checks: runs `rows` and returns the logits of `logitRows`, [logitRows.count, vocab].
    public func logits(rows: [BatchRow], logitRows: [Int]) throws -> [Float] {
        try step(rows, logitRows: logitRows)
        return try logits.view(at: 0, count: logitRows.count * config.vocabularySize).download()
    }
}

/// Batched generation for callers whose prompt lengths change from call to call (evaluation): keeps the weights and
/// makes (or reuses) a `CUDABatchedInference` whose slots hold the longest prompt + `maxTokens`.
// 128 slots by default: 1,000 prompts x 64 new tokens on the 8B shape run at 19.7x batch-1 with 64 slots, 22.7x with
// 128 (0.7 GB more), 24.1x with 256 (docs/PERFORMANCE.md, session 4).
public final class CUDABatchedGenerator {
    public let weights: CUDAInference
    /// Sequences decoded together.
    public let slots: Int
    var inference: CUDABatchedInference?

    public init(weights: CUDAInference, slots: Int = 128) throws {
        guard slots > 0 else { throw UsageError("batched generation needs at least one sequence slot, got \(slots)") }
        self.weights = weights
        self.slots = slots
    }

    /// The model (NF4 + double quant base, LoRA unmerged) uploaded for generation.
    /// `sharing`: NF4 base weights already on the GPU by layer name (the trainer's), used instead of uploading them again.
    public convenience init(context: CUDAContext, model: DecoderModel, slots: Int = 128, sharing frozen: [String: CUDANF4Weight] = [:]) throws {
        try self.init(weights: CUDAInference(context: context, model: model, capacity: 1, sharing: frozen), slots: slots)
    }

    /// Answers `prompts`, prompt i sampled with `sampling[i]`.
    public func generate(prompts: [[Int]], sampling: [SamplingOptions], maxTokens: Int, stopIDs: Set<Int>,
                         onAnswer: (Int, GenerationResult) -> Void = { _, _ in }) throws -> BatchedAnswers {
        guard let longest = prompts.map(\.count).max() else {
            return BatchedAnswers(answers: [], promptTokens: 0, generatedTokens: 0, seconds: 0)
        }
        let capacity = longest + max(maxTokens, 1)
        guard capacity <= weights.config.maxPositionEmbeddings else {
            throw UsageError("the longest prompt (\(longest) tokens) + max new tokens (\(maxTokens)) exceed the model's \(weights.config.maxPositionEmbeddings) positions")
        }
        if inference.map({ $0.capacity < capacity }) ?? true {
            inference = nil  // its caches go back to the allocator first
            inference = try CUDABatchedInference(weights: weights, slots: slots, capacity: capacity)
        }
        return try inference!.generate(prompts: prompts, sampling: sampling, maxTokens: maxTokens, stopIDs: stopIDs, onAnswer: onAnswer)
    }
}

/// The GPU's answer to `ComputeDevice.batchGenerator`: every request through the continuous-batching slots, so
/// `eval --generate`, the demo's exact match and `generate --prompts-file` read the 4-bit weights once per step
/// for all the sequences in flight. The scheduler streams any number of prompts through the slots.
extension CUDABatchedGenerator: BatchGenerator {
    public var deviceName: String { "cuda" }
    public var maxBatchSize: Int { 1024 }

    public func generate(_ requests: [GenerationRequest], maxTokens: Int, stopIDs: Set<Int>) throws -> [GeneratedSequence] {
        try generate(prompts: requests.map(\.prompt), sampling: requests.map(\.sampling), maxTokens: maxTokens, stopIDs: stopIDs)
            .answers.map { GeneratedSequence(tokens: $0.tokens, stoppedAtEOS: $0.stoppedAtEOS) }
    }
}
