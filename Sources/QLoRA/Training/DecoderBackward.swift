// Training forward and hand-written backward of the decoder on the CPU, for LoRA, with every variation
// DecoderConfig describes (the per-op derivatives of the variations are in CPUOps.swift's header).
//
// The base is frozen, so only two kinds of gradient flow: the gradient of the loss with respect
// to each activation (to reach earlier layers), and the gradients of the LoRA matrices.
//
// Linear with LoRA, y = x·Wᵀ + s·(d(x)·Aᵀ)·Bᵀ, with d the dropout mask (d(x) = x·m/(1-p), m from DropoutMask's
// counter-based hash of the linear's seed and the element index) and z = d(x)·Aᵀ:
//   dx = dy·W + d(s·(dy·B)·A)       dA = s·(dy·B)ᵀ·d(x)       dB = s·dyᵀ·z
// RMSNorm, y = x·r·w with r = (mean(x²) + eps)^-½:
//   dx = r·(dy⊙w) − x·r³·mean(dy⊙w⊙x)
// SwiGLU, a = silu(g)·u with silu(g) = g·σ(g):
//   du = da·silu(g)                 dg = da·u·σ(g)·(1 + g·(1 − σ(g)))
// Attention per head, S = Q·Kᵀ·c (c = 1/√D, causal and example mask), P = softmax(S), O = P·V:
//   dV = Pᵀ·dO    dP = dO·Vᵀ    dS = P⊙(dP − rowsum(dP⊙P))    dQ = dS·K·c    dK = dSᵀ·Q·c
// RoPE is a rotation per pair, so its backward is the rotation by the opposite angle. Partial rotary (Phi-3) rotates
// pairs (i, i + R/2) of the first R dimensions of a head and passes the rest through: y = [m·R(θ)·x_rot, x_pass], so
//   dx_rot = m·R(−θ)·dy_rot      dx_pass = dy_pass
// with m longrope's attention factor on cos and sin (1 otherwise): (m·R(θ))ᵀ = m·R(−θ). The short or long factors only
// change θ, and are chosen per forward as transformers chooses them (DecoderConfig.usesLongRopeFactors).
// Fused projections (Phi-3), [q | k | v] = x·Wᵀ + s·(d(x)·Aᵀ)·Bᵀ with W, B the fused [q + 2kv, ·] matrices, then split by
// columns: the split is a column selection, so the fused output's gradient is the parts' gradients side by side,
//   dy_fused = [dq | dk | dv]       (and [dgate | dup] for gate_up_proj)
// and the fused linear's backward above gives dx and exactly PEFT's dA, dB of the fused module (A is shared by the
// three parts: dA = s·(dy_fused·B)ᵀ·d(x) sums their contributions; dB's rows are each part's own).
// Cross-entropy over the shifted labels, mean over the counted tokens N:
//   dlogits = (softmax(logits) − onehot(label)) / N, computed a chunk of rows at a time so the
//   logits of the whole vocabulary never exist for all tokens at once.
//
// The variations, by the chain rule through the block of DecoderModel.swift:
// - (1 + w) norms: RMSNorm's backward with w + 1 in place of w (every norm, q/k norms and the final norm too).
// - q/k norm: q = rope(qn(q_proj(n1))) with qn an RMSNorm over each head's D values, so
//   dq_proj = RMSNorm backward (rows of D, one per token and head) of rope⁻¹(dq); k likewise.
// - Sandwich norms: h = x + n_ao(o), y = h + n_mo(m):  dh = dy + n2ᵀ(dn2),  dm = n_moᵀ(dy),  do = n_aoᵀ(dh),  dx = dh + n1ᵀ(dn1)
//   (nᵀ(g) is the norm's backward at its input, given g at its output).
// - GeGLU instead of SwiGLU (derivative in CPUOps.swift).
// - Attention: logit scale query_pre_attn_scalar^-½, soft-capping c·tanh(S / c) (dS ⊙ (1 − tanh²)), and sliding
//   windows (the same mask in backward: a query sees keys max(start, t − window + 1)…t of its example).
// - Embedding scale √hidden: a constant on a frozen input; nothing flows back to the embedding.
// - Final-logit soft-capping, l = c·tanh(z / c):  dz = dl·(1 − (l / c)²).

#if canImport(Glibc)
import Glibc
#endif

/// The gradients of every LoRA matrix, keyed by module path.
public final class LoRAGradients: @unchecked Sendable {
    public private(set) var a: [String: Matrix] = [:]
    public private(set) var b: [String: Matrix] = [:]

    public init(model: DecoderModel) {
        for layer in model.linearLayers {
            guard let lora = layer.lora else { continue }
            a[layer.name] = Matrix(rows: lora.a.rows, columns: lora.a.columns)
            b[layer.name] = Matrix(rows: lora.b.rows, columns: lora.b.columns)
        }
    }

    public func zero() {
        for m in a.values { m.storage.update(repeating: 0) }
        for m in b.values { m.storage.update(repeating: 0) }
    }

    /// (name, gradient) pairs in PEFT's key naming, sorted by name.
    public var named: [(String, Matrix)] {
        (a.map { ("base_model.model.\($0.key).lora_A.weight", $0.value) } + b.map { ("base_model.model.\($0.key).lora_B.weight", $0.value) })
            .sorted { $0.0 < $1.0 }
    }
}

/// How a training step runs.
public struct TrainingStepOptions: Sendable {
    /// Keep only each block's input and recompute the block in the backward pass.
    public var gradientCheckpointing = true
    /// Rows of logits computed at once by the chunked cross-entropy.
    public var lossChunkRows = 64
    /// Seed of this step's dropout masks (no dropout when every adapter's dropout is 0).
    public var dropoutSeed: UInt64 = 0

    public init(gradientCheckpointing: Bool = true, lossChunkRows: Int = 64, dropoutSeed: UInt64 = 0) {
        self.gradientCheckpointing = gradientCheckpointing
        self.lossChunkRows = lossChunkRows
        self.dropoutSeed = dropoutSeed
    }
}

/// The result of a forward + backward: the summed loss over `count` counted tokens.
public struct LossSum: Sendable {
    public var sum: Double
    public var count: Int
    /// The mean over the counted tokens; 0 when none is counted (never NaN: callers that need tokens check `count`).
    public var mean: Double { count == 0 ? 0 : sum / Double(count) }
}

// MARK: - Activations of one block

/// What the backward of one block needs from its forward. N tokens.
final class BlockActivations {
    let input: Matrix          // x [N, H]
    let norm1: Matrix          // [N, H]
    let q: Matrix              // after (q norm and) RoPE [N, qDim]
    let k: Matrix              // after (k norm and) RoPE [N, kvDim]
    let v: Matrix              // [N, kvDim]
    /// q_proj and k_proj outputs before the q/k norms (nil without them).
    let qProjected: Matrix?    // [N, qDim]
    let kProjected: Matrix?    // [N, kvDim]
    let attended: Matrix       // attention output before o_proj [N, qDim]
    /// o_proj's output before the attention-output norm (sandwich norms only).
    let attentionProjected: Matrix?  // [N, H]
    let hidden: Matrix         // h = x + [n_ao](o_proj(attended)) [N, H]
    let norm2: Matrix          // [N, H]
    let gate: Matrix           // [N, I]
    let up: Matrix             // [N, I]
    let activated: Matrix      // act(gate)·up [N, I]
    /// down_proj's output before the MLP-output norm (sandwich norms only).
    let mlpProjected: Matrix?  // [N, H]
    let output: Matrix         // y = h + [n_mo](down_proj(activated)) [N, H]
    /// LoRA intermediates per linear: the dropped-out input (nil without dropout) and z = d(x)·Aᵀ.
    var loraInputs: [String: Matrix] = [:]
    var loraHidden: [String: Matrix] = [:]
    /// Each linear's dropout seed (DropoutMask: a hash of the block's seed and the linear's index), so that
    /// recomputation draws the same masks.
    var dropoutSeeds: [String: UInt64] = [:]

    init(config c: DecoderConfig, tokens n: Int, input: Matrix) {
        self.input = input
        norm1 = Matrix(rows: n, columns: c.hiddenSize)
        q = Matrix(rows: n, columns: c.qDim)
        k = Matrix(rows: n, columns: c.kvDim)
        v = Matrix(rows: n, columns: c.kvDim)
        qProjected = c.qkNorm ? Matrix(rows: n, columns: c.qDim) : nil
        kProjected = c.qkNorm ? Matrix(rows: n, columns: c.kvDim) : nil
        attended = Matrix(rows: n, columns: c.qDim)
        attentionProjected = c.sandwichNorms ? Matrix(rows: n, columns: c.hiddenSize) : nil
        mlpProjected = c.sandwichNorms ? Matrix(rows: n, columns: c.hiddenSize) : nil
        hidden = Matrix(rows: n, columns: c.hiddenSize)
        norm2 = Matrix(rows: n, columns: c.hiddenSize)
        gate = Matrix(rows: n, columns: c.intermediateSize)
        up = Matrix(rows: n, columns: c.intermediateSize)
        activated = Matrix(rows: n, columns: c.intermediateSize)
        output = Matrix(rows: n, columns: c.hiddenSize)
    }
}

extension DecoderModel {
    /// Forward and backward over one micro-batch. Adds the LoRA gradients of
    /// `lossSum / normalizer` into `gradients` (pass the counted tokens of all accumulated
    /// micro-batches as `normalizer`, as transformers does) and returns the summed loss.
    public func accumulateGradients(batch: TrainingBatch, into gradients: LoRAGradients, normalizer: Int,
                                    options: TrainingStepOptions = TrainingStepOptions()) throws -> LossSum {
        let c = config
        let n = batch.tokenCount
        let h = c.hiddenSize
        try batch.checkIDs(vocabularySize: c.vocabularySize)
        try c.checkTrainable()
        growRope(to: Int(batch.positions.max() ?? 0) + 1)

        // Forward through the blocks, keeping what the backward needs.
        var x = Matrix(rows: n, columns: h)
        embed(batch.tokens, into: x)
        var saved: [BlockActivations] = []
        var inputs: [Matrix] = []
        var dropoutSeeds: [UInt64] = []
        for (l, block) in blocks.enumerated() {
            let seed = DropoutMask.blockSeed(stepSeed: options.dropoutSeed, block: l)
            dropoutSeeds.append(seed)
            try shardedBase?.gather(l)
            let activations = blockForward(block, layer: l, input: x, batch: batch, dropoutSeed: seed)
            // Without checkpointing the last block's backward follows at once: it keeps its gathered weights.
            if l < blocks.count - 1 || options.gradientCheckpointing { shardedBase?.release(l) }
            if options.gradientCheckpointing { inputs.append(x) } else { saved.append(activations) }
            x = activations.output
        }

        // Head and loss, a chunk of rows at a time; dx receives the gradient of the final hidden state.
        let dx = Matrix(rows: n, columns: h)
        let loss = try headLossAndGradient(finalHidden: x, batch: batch, normalizer: normalizer, chunkRows: options.lossChunkRows, into: dx)

        // Backward through the blocks, last first.
        var gradient = dx
        for l in stride(from: blocks.count - 1, through: 0, by: -1) {
            try shardedBase?.gather(l)
            defer { shardedBase?.release(l) }
            let activations = options.gradientCheckpointing
                ? blockForward(blocks[l], layer: l, input: inputs[l], batch: batch, dropoutSeed: dropoutSeeds[l])
                : saved[l]
            gradient = blockBackward(blocks[l], layer: l, activations: activations, outputGradient: gradient, batch: batch, gradients: gradients)
            if options.gradientCheckpointing { inputs.removeLast() } else { saved.removeLast() }
        }
        return loss
    }

    /// The mean loss over a batch without gradients (evaluation).
    public func loss(batch: TrainingBatch) throws -> LossSum {
        let c = config
        let n = batch.tokenCount
        try batch.checkIDs(vocabularySize: c.vocabularySize)
        growRope(to: Int(batch.positions.max() ?? 0) + 1)
        var x = Matrix(rows: n, columns: c.hiddenSize)
        embed(batch.tokens, into: x)
        for (l, block) in blocks.enumerated() {
            try shardedBase?.gather(l)
            x = blockForward(block, layer: l, input: x, batch: batch, dropoutSeed: nil).output
            shardedBase?.release(l)
        }
        return try headLossAndGradient(finalHidden: x, batch: batch, normalizer: 1, chunkRows: 64, into: nil)
    }

    // MARK: - Block forward

    func blockForward(_ block: DecoderBlock, layer l: Int, input: Matrix, batch: TrainingBatch, dropoutSeed: UInt64?) -> BlockActivations {
        let c = config
        let n = batch.tokenCount
        let h = c.hiddenSize
        let offset = c.normWeightOffset
        let longRope = usesLongRopeFactors(batch)
        let a = BlockActivations(config: c, tokens: n, input: input)
        if let dropoutSeed {
            for (j, layer) in block.linears.enumerated() { a.dropoutSeeds[layer.name] = DropoutMask.linearSeed(blockSeed: dropoutSeed, linear: j) }
        }
        CPUOps.rmsNorm(input.pointer, weight: block.inputNorm, offset: offset, eps: c.rmsNormEps, rows: n, width: h, into: a.norm1.pointer)
        groupForward(block.attentionInput, a.norm1, saving: a, into: [a.qProjected ?? a.q, a.kProjected ?? a.k, a.v])
        if let qNorm = block.qNorm, let kNorm = block.kNorm, let qp = a.qProjected, let kp = a.kProjected {
            CPUOps.rmsNorm(qp.pointer, weight: qNorm, offset: offset, eps: c.rmsNormEps, rows: n * c.headCount, width: c.headDim, into: a.q.pointer)
            CPUOps.rmsNorm(kp.pointer, weight: kNorm, offset: offset, eps: c.rmsNormEps, rows: n * c.kvHeadCount, width: c.headDim, into: a.k.pointer)
        }
        let table = ropeTable(layer: l)
        batch.positions.withUnsafeBufferPointer { p in
            CPUOps.applyRope(a.q.pointer, positions: p.baseAddress!, rows: n, heads: c.headCount, headDim: c.headDim, table: table, long: longRope)
            CPUOps.applyRope(a.k.pointer, positions: p.baseAddress!, rows: n, heads: c.kvHeadCount, headDim: c.headDim, table: table, long: longRope)
        }
        let kind = c.layerAttention[l]
        for r in 0..<batch.rows {
            let offset = r * batch.length
            CPUOps.attention(q: a.q.pointer + offset * c.qDim, keys: a.k.pointer + offset * c.kvDim, values: a.v.pointer + offset * c.kvDim,
                             rows: batch.length, heads: c.headCount, kvHeads: c.kvHeadCount, headDim: c.headDim,
                             scale: c.attentionScale, softcap: c.attentionSoftcap,
                             visible: { t in kind.visible(position: t, first: Int(batch.exampleStarts[offset + t])) },
                             into: a.attended.pointer + offset * c.qDim)
        }
        if let norm = block.attentionOutputNorm, let projected = a.attentionProjected {
            linearForward(block.o, a.attended, saving: a, into: projected.pointer)
            CPUOps.rmsNorm(projected.pointer, weight: norm, offset: offset, eps: c.rmsNormEps, rows: n, width: h, into: a.hidden.pointer)
        } else {
            linearForward(block.o, a.attended, saving: a, into: a.hidden.pointer)
        }
        for i in 0..<(n * h) { a.hidden.pointer[i] += input.pointer[i] }
        CPUOps.rmsNorm(a.hidden.pointer, weight: block.mlpInputNorm, offset: offset, eps: c.rmsNormEps, rows: n, width: h, into: a.norm2.pointer)
        groupForward(block.mlpInput, a.norm2, saving: a, into: [a.gate, a.up])
        CPUOps.gatedActivation(c.mlpActivation, gate: a.gate.pointer, up: a.up.pointer, count: n * c.intermediateSize, into: a.activated.pointer)
        if let norm = block.mlpOutputNorm, let projected = a.mlpProjected {
            linearForward(block.down, a.activated, saving: a, into: projected.pointer)
            CPUOps.rmsNorm(projected.pointer, weight: norm, offset: offset, eps: c.rmsNormEps, rows: n, width: h, into: a.output.pointer)
        } else {
            linearForward(block.down, a.activated, saving: a, into: a.output.pointer)
        }
        for i in 0..<(n * h) { a.output.pointer[i] += a.hidden.pointer[i] }
        return a
    }

    /// transformers picks longrope's factors from the largest position id of the whole forward call.
    func usesLongRopeFactors(_ batch: TrainingBatch) -> Bool {
        config.usesLongRopeFactors(sequenceLength: Int(batch.positions.max() ?? 0) + 1)
    }

    /// A projection group (`DecoderBlock.attentionInput` or `.mlpInput`) on x into `parts`: one linear per part, or
    /// one fused linear whose output is split by columns.
    func groupForward(_ group: [Linear], _ x: Matrix, saving a: BlockActivations, into parts: [Matrix]) {
        if group.count == parts.count {
            for (layer, part) in zip(group, parts) { linearForward(layer, x, saving: a, into: part.pointer) }
            return
        }
        precondition(group.count == 1, "a projection group is one fused linear or one linear per part")
        let fused = Matrix(rows: x.rows, columns: group[0].outFeatures)
        linearForward(group[0], x, saving: a, into: fused.pointer)
        CPUOps.splitColumns(fused.pointer, rows: x.rows, into: parts.map { ($0.pointer, $0.columns) })
    }

    /// y = x·Wᵀ (+ bias) + s·(d(x)·Aᵀ)·Bᵀ, saving the LoRA intermediates in `a`.
    func linearForward(_ layer: Linear, _ x: Matrix, saving a: BlockActivations, into y: UnsafeMutablePointer<Float>) {
        let n = x.rows
        layer.weight.multiplyTransposed(x.pointer, rows: n, into: y)
        if let bias = layer.bias {
            for t in 0..<n { for o in 0..<layer.outFeatures { y[t * layer.outFeatures + o] += bias[o] } }
        }
        guard let lora = layer.lora else { return }
        var loraInput = x
        if lora.dropout > 0, let seed = a.dropoutSeeds[layer.name] {
            let dropped = Matrix(rows: n, columns: layer.inFeatures)
            let keep = 1 - lora.dropout
            for i in 0..<dropped.count { dropped.pointer[i] = DropoutMask.keeps(seed: seed, index: i, keep: keep) ? x.pointer[i] / keep : 0 }
            a.loraInputs[layer.name] = dropped
            loraInput = dropped
        }
        let z = Matrix(rows: n, columns: lora.rank)
        CPUMatmul.gemmNT(loraInput.pointer, lora.a.pointer, z.pointer, m: n, n: lora.rank, k: layer.inFeatures)
        a.loraHidden[layer.name] = z
        let scaled = Matrix(rows: n, columns: lora.rank)
        for i in 0..<z.count { scaled.pointer[i] = z.pointer[i] * lora.scale }
        CPUMatmul.gemmNT(scaled.pointer, lora.b.pointer, y, m: n, n: layer.outFeatures, k: lora.rank, accumulate: true)
    }
}

// MARK: - Loss

extension DecoderModel {
    /// Final norm, head and cross-entropy, `chunkRows` tokens at a time. Writes d(loss/normalizer)/d(finalHidden)
    /// into `dx` when given. Returns the summed loss and the number of counted tokens.
    func headLossAndGradient(finalHidden x: Matrix, batch: TrainingBatch, normalizer: Int, chunkRows: Int, into dx: Matrix?) throws -> LossSum {
        let c = config
        let h = c.hiddenSize
        let n = batch.tokenCount
        // target[i]: the label the logits of token i predict (the next label in the same row), or ignored.
        var targets = [Int32](repeating: TrainingBatch.ignoreIndex, count: n)
        for r in 0..<batch.rows { for t in 0..<(batch.length - 1) { targets[r * batch.length + t] = batch.labels[r * batch.length + t + 1] } }
        let normed = Matrix(rows: n, columns: h)
        CPUOps.rmsNorm(x.pointer, weight: finalNorm, offset: c.normWeightOffset, eps: c.rmsNormEps, rows: n, width: h, into: normed.pointer)
        // Only tokens whose target counts need logits: their rows, in order.
        let countedRows = (0..<n).filter { targets[$0] != TrainingBatch.ignoreIndex }
        let rows = Matrix(rows: max(countedRows.count, 1), columns: h)
        for (r, i) in countedRows.enumerated() { (rows.pointer + r * h).update(from: normed.pointer + i * h, count: h) }
        let dRows = dx == nil ? nil : Matrix(rows: max(countedRows.count, 1), columns: h)
        // The cross-entropy over the whole vocabulary here, or over this rank's slice of it (Parallel/VocabularyParallelLoss.swift).
        let total = try VocabularyParallelLoss.lossAndGradient(
            rows: rows.pointer, count: countedRows.count, targets: countedRows.map { targets[$0] }, head: head.pointer, hidden: h,
            vocab: c.vocabularySize, softcap: c.finalLogitSoftcap, normalizer: normalizer, chunkRows: chunkRows,
            gradient: dRows?.pointer, collective: vocabularyParallel)
        if let dx, let dRows {
            let dNormed = Matrix(rows: n, columns: h)
            for (r, i) in countedRows.enumerated() { (dNormed.pointer + i * h).update(from: dRows.pointer + r * h, count: h) }
            CPUOps.rmsNormBackward(x.pointer, weight: finalNorm, offset: c.normWeightOffset, eps: c.rmsNormEps, outputGradient: dNormed.pointer,
                                   rows: n, width: h, into: dx.pointer, accumulate: false)
        }
        return LossSum(sum: total, count: countedRows.count)
    }
}

// MARK: - Block backward

extension DecoderModel {
    /// Through Gemma's norm after a sublayer (x -> n(x) before the residual add), or dy itself where the block has none.
    func sandwichNormBackward(_ norm: [Float]?, input: Matrix?, outputGradient dy: Matrix) -> Matrix {
        guard let norm, let input else { return dy }
        let dx = Matrix(rows: dy.rows, columns: dy.columns)
        CPUOps.rmsNormBackward(input.pointer, weight: norm, offset: config.normWeightOffset, eps: config.rmsNormEps,
                               outputGradient: dy.pointer, rows: dy.rows, width: dy.columns, into: dx.pointer, accumulate: false)
        return dx
    }

    /// Given dL/dy for the block output, accumulates the LoRA gradients and returns dL/dx for its input.
    func blockBackward(_ block: DecoderBlock, layer l: Int, activations a: BlockActivations, outputGradient dy: Matrix,
                       batch: TrainingBatch, gradients: LoRAGradients) -> Matrix {
        let c = config
        let n = batch.tokenCount
        let h = c.hiddenSize
        let offset = c.normWeightOffset
        // y = hidden + [n_mo](down(activated)): the residual passes dy straight to hidden.
        let dMLPOut = sandwichNormBackward(block.mlpOutputNorm, input: a.mlpProjected, outputGradient: dy)
        let dActivated = Matrix(rows: n, columns: c.intermediateSize)
        linearBackward(block.down, input: a.activated, activations: a, outputGradient: dMLPOut, gradients: gradients, into: dActivated, accumulate: false)
        let dGate = Matrix(rows: n, columns: c.intermediateSize)
        let dUp = Matrix(rows: n, columns: c.intermediateSize)
        CPUOps.gatedActivationBackward(c.mlpActivation, gate: a.gate.pointer, up: a.up.pointer, outputGradient: dActivated.pointer,
                                       count: n * c.intermediateSize, gateGradient: dGate.pointer, upGradient: dUp.pointer)
        let dNorm2 = Matrix(rows: n, columns: h)
        groupBackward(block.mlpInput, input: a.norm2, activations: a, outputGradients: [dGate, dUp], gradients: gradients, into: dNorm2)
        let dHidden = Matrix(rows: n, columns: h)
        _ = dHidden.storage.update(fromContentsOf: dy.storage)
        CPUOps.rmsNormBackward(a.hidden.pointer, weight: block.mlpInputNorm, offset: offset, eps: c.rmsNormEps, outputGradient: dNorm2.pointer,
                               rows: n, width: h, into: dHidden.pointer, accumulate: true)

        // hidden = input + [n_ao](o(attended))
        let dAttentionOut = sandwichNormBackward(block.attentionOutputNorm, input: a.attentionProjected, outputGradient: dHidden)
        let dAttended = Matrix(rows: n, columns: c.qDim)
        linearBackward(block.o, input: a.attended, activations: a, outputGradient: dAttentionOut, gradients: gradients, into: dAttended, accumulate: false)
        let dq = Matrix(rows: n, columns: c.qDim)
        let dk = Matrix(rows: n, columns: c.kvDim)
        let dv = Matrix(rows: n, columns: c.kvDim)
        let kind = c.layerAttention[l]
        for r in 0..<batch.rows {
            let offset = r * batch.length
            CPUOps.attentionBackward(q: a.q.pointer + offset * c.qDim, keys: a.k.pointer + offset * c.kvDim, values: a.v.pointer + offset * c.kvDim,
                                     outputGradient: dAttended.pointer + offset * c.qDim,
                                     rows: batch.length, heads: c.headCount, kvHeads: c.kvHeadCount, headDim: c.headDim,
                                     scale: c.attentionScale, softcap: c.attentionSoftcap,
                                     visible: { t in kind.visible(position: t, first: Int(batch.exampleStarts[offset + t])) },
                                     queryGradient: dq.pointer + offset * c.qDim, keyGradient: dk.pointer + offset * c.kvDim,
                                     valueGradient: dv.pointer + offset * c.kvDim)
        }
        let longRope = usesLongRopeFactors(batch)
        let table = ropeTable(layer: l)
        batch.positions.withUnsafeBufferPointer { p in
            CPUOps.applyRope(dq.pointer, positions: p.baseAddress!, rows: n, heads: c.headCount, headDim: c.headDim, table: table,
                             long: longRope, inverse: true)
            CPUOps.applyRope(dk.pointer, positions: p.baseAddress!, rows: n, heads: c.kvHeadCount, headDim: c.headDim, table: table,
                             long: longRope, inverse: true)
        }
        var dqProjected = dq, dkProjected = dk
        if let qNorm = block.qNorm, let kNorm = block.kNorm, let qp = a.qProjected, let kp = a.kProjected {
            dqProjected = Matrix(rows: n, columns: c.qDim)
            dkProjected = Matrix(rows: n, columns: c.kvDim)
            CPUOps.rmsNormBackward(qp.pointer, weight: qNorm, offset: offset, eps: c.rmsNormEps, outputGradient: dq.pointer,
                                   rows: n * c.headCount, width: c.headDim, into: dqProjected.pointer, accumulate: false)
            CPUOps.rmsNormBackward(kp.pointer, weight: kNorm, offset: offset, eps: c.rmsNormEps, outputGradient: dk.pointer,
                                   rows: n * c.kvHeadCount, width: c.headDim, into: dkProjected.pointer, accumulate: false)
        }
        let dNorm1 = Matrix(rows: n, columns: h)
        groupBackward(block.attentionInput, input: a.norm1, activations: a, outputGradients: [dqProjected, dkProjected, dv],
                      gradients: gradients, into: dNorm1)
        let dx = dHidden  // the residual path; the norm's gradient is added on top
        CPUOps.rmsNormBackward(a.input.pointer, weight: block.inputNorm, offset: offset, eps: c.rmsNormEps, outputGradient: dNorm1.pointer,
                               rows: n, width: h, into: dx.pointer, accumulate: true)
        return dx
    }

    /// The backward of `groupForward`: dx = Σ over the group's linears of their input gradients (written, not
    /// accumulated); a fused linear takes the parts' gradients side by side.
    func groupBackward(_ group: [Linear], input x: Matrix, activations a: BlockActivations, outputGradients parts: [Matrix],
                       gradients: LoRAGradients, into dx: Matrix) {
        if group.count == parts.count {
            for (j, (layer, dy)) in zip(group, parts).enumerated() {
                linearBackward(layer, input: x, activations: a, outputGradient: dy, gradients: gradients, into: dx, accumulate: j > 0)
            }
            return
        }
        precondition(group.count == 1, "a projection group is one fused linear or one linear per part")
        let fused = Matrix(rows: x.rows, columns: group[0].outFeatures)
        CPUOps.joinColumns(parts.map { (UnsafePointer($0.pointer), $0.columns) }, rows: x.rows, into: fused.pointer)
        linearBackward(group[0], input: x, activations: a, outputGradient: fused, gradients: gradients, into: dx, accumulate: false)
    }

    /// dx (+)= dy·W + d(s·(dy·B)·A); dA += s·(dy·B)ᵀ·d(x); dB += s·dyᵀ·z.
    func linearBackward(_ layer: Linear, input x: Matrix, activations a: BlockActivations, outputGradient dy: Matrix,
                        gradients: LoRAGradients, into dx: Matrix, accumulate: Bool) {
        let n = x.rows
        layer.weight.multiply(dy.pointer, rows: n, into: dx.pointer, accumulate: accumulate)
        guard let lora = layer.lora, let z = a.loraHidden[layer.name],
              let dA = gradients.a[layer.name], let dB = gradients.b[layer.name] else { return }
        let r = lora.rank
        // dB += s·dyᵀ·z   [out, r]
        let scaledZ = Matrix(rows: n, columns: r)
        for i in 0..<scaledZ.count { scaledZ.pointer[i] = z.pointer[i] * lora.scale }
        CPUMatmul.gemmTN(dy.pointer, scaledZ.pointer, dB.pointer, m: layer.outFeatures, n: r, k: n, accumulate: true)
        // g = s·dy·B   [N, r]
        let g = Matrix(rows: n, columns: r)
        CPUMatmul.gemmNN(dy.pointer, lora.b.pointer, g.pointer, m: n, n: r, k: layer.outFeatures)
        for i in 0..<g.count { g.pointer[i] *= lora.scale }
        // dA += gᵀ·d(x)   [r, in]
        let loraInput = a.loraInputs[layer.name] ?? x
        CPUMatmul.gemmTN(g.pointer, loraInput.pointer, dA.pointer, m: r, n: layer.inFeatures, k: n, accumulate: true)
        // dx += d(g·A): through the dropout mask when there is one.
        if a.loraInputs[layer.name] != nil, let seed = a.dropoutSeeds[layer.name] {
            let dxLoRA = Matrix(rows: n, columns: layer.inFeatures)
            CPUMatmul.gemmNN(g.pointer, lora.a.pointer, dxLoRA.pointer, m: n, n: layer.inFeatures, k: r)
            // The same mask as the forward: the same seed and element indices (DropoutMask).
            let keep = 1 - lora.dropout
            for i in 0..<dxLoRA.count where DropoutMask.keeps(seed: seed, index: i, keep: keep) {
                dx.pointer[i] += dxLoRA.pointer[i] / keep
            }
        } else {
            CPUMatmul.gemmNN(g.pointer, lora.a.pointer, dx.pointer, m: n, n: layer.inFeatures, k: r, accumulate: true)
        }
    }
}
