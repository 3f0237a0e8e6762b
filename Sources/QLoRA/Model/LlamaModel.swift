// The Llama-family decoder on the CPU: embedding → N × (RMSNorm, attention, RMSNorm, SwiGLU MLP) → RMSNorm → head.
//
// Block, as transformers' LlamaDecoderLayer computes it:
//   h = x + o_proj(attention(rope(q_proj(norm1(x))), rope(k_proj(norm1(x))), v_proj(norm1(x))))
//   y = h + down_proj(silu(gate_proj(norm2(h))) * up_proj(norm2(h)))

/// One decoder block's weights.
public final class LlamaBlock: @unchecked Sendable {
    public let inputNorm: [Float]
    public let postAttentionNorm: [Float]
    public let q: Linear, k: Linear, v: Linear, o: Linear
    public let gate: Linear, up: Linear, down: Linear

    public init(inputNorm: [Float], postAttentionNorm: [Float], q: Linear, k: Linear, v: Linear, o: Linear, gate: Linear, up: Linear, down: Linear) {
        self.inputNorm = inputNorm
        self.postAttentionNorm = postAttentionNorm
        self.q = q; self.k = k; self.v = v; self.o = o
        self.gate = gate; self.up = up; self.down = down
    }

    /// The seven projections, in the order PEFT lists them.
    public var linears: [Linear] { [q, k, v, o, gate, up, down] }
}

/// Where a model's frozen base weights come from: a dense checkpoint, or a 4-bit one dequantized on load.
public protocol BaseWeightSource {
    /// The directory or file the weights were read from, for messages.
    var origin: String { get }
    func contains(_ name: String) -> Bool
    /// A tensor's values in fp32 with its shape.
    func tensor(_ name: String) throws -> (values: [Float], shape: [Int])
    /// The 4-bit form of a linear weight, when the source holds (or makes) one; nil for dense weights.
    func quantizedWeight(_ name: String) throws -> QuantizedWeight?
}

extension BaseWeightSource {
    public func quantizedWeight(_ name: String) throws -> QuantizedWeight? { nil }
}

extension SafeTensorsCheckpoint: BaseWeightSource {
    public var origin: String { directory }
    public func tensor(_ name: String) throws -> (values: [Float], shape: [Int]) {
        guard let info = info(name) else { throw FileFormatError(file: directory, place: "tensor '\(name)'", "not found in the checkpoint") }
        return (try floats(name), info.shape)
    }
}

/// A Llama-family model with its weights in fp32 on the CPU.
public final class LlamaModel: @unchecked Sendable {
    public let config: LlamaConfig
    public let embedding: Matrix          // [vocab, H]
    public let blocks: [LlamaBlock]
    public let finalNorm: [Float]         // [H]
    /// The output head, [vocab, H]; the embedding itself when tied.
    public let head: Matrix
    public let rope: RopeTable

    public init(config: LlamaConfig, embedding: Matrix, blocks: [LlamaBlock], finalNorm: [Float], head: Matrix) {
        self.config = config
        self.embedding = embedding
        self.blocks = blocks
        self.finalNorm = finalNorm
        self.head = head
        rope = RopeTable(config: config, positions: min(config.maxPositionEmbeddings, 4096))
    }

    /// Loads the weights named as transformers names them from `source`.
    public convenience init(config: LlamaConfig, weights source: BaseWeightSource) throws {
        func tensor(_ name: String, _ shape: [Int]) throws -> [Float] {
            let (values, actual) = try source.tensor(name)
            guard actual == shape else {
                throw FileFormatError(file: source.origin, place: "tensor '\(name)'", "shape \(actual), expected \(shape) from config.json")
            }
            return values
        }
        func matrix(_ name: String, _ rows: Int, _ columns: Int) throws -> Matrix {
            Matrix(rows: rows, columns: columns, values: try tensor(name, [rows, columns]))
        }
        let c = config
        func linear(_ module: String, out: Int, in inFeatures: Int, bias: Bool = false) throws -> Linear {
            let name = module + ".weight"
            let weight: FrozenWeight
            if let q = try source.quantizedWeight(name) {
                guard q.shape == [out, inFeatures] else {
                    throw FileFormatError(file: source.origin, place: "tensor '\(name)'", "shape \(q.shape), expected \([out, inFeatures]) from config.json")
                }
                weight = try FrozenWeight(quantized: q)
            } else {
                weight = FrozenWeight(dense: try matrix(name, out, inFeatures))
            }
            return Linear(name: module, weight: weight, bias: bias ? try tensor(module + ".bias", [out]) : nil)
        }
        let embedding = try matrix("model.embed_tokens.weight", c.vocabularySize, c.hiddenSize)
        var blocks: [LlamaBlock] = []
        for l in 0..<c.layerCount {
            let p = "model.layers.\(l)."
            blocks.append(LlamaBlock(
                inputNorm: try tensor(p + "input_layernorm.weight", [c.hiddenSize]),
                postAttentionNorm: try tensor(p + "post_attention_layernorm.weight", [c.hiddenSize]),
                q: try linear(p + "self_attn.q_proj", out: c.qDim, in: c.hiddenSize, bias: c.attentionBias),
                k: try linear(p + "self_attn.k_proj", out: c.kvDim, in: c.hiddenSize, bias: c.attentionBias),
                v: try linear(p + "self_attn.v_proj", out: c.kvDim, in: c.hiddenSize, bias: c.attentionBias),
                o: try linear(p + "self_attn.o_proj", out: c.hiddenSize, in: c.qDim),
                gate: try linear(p + "mlp.gate_proj", out: c.intermediateSize, in: c.hiddenSize),
                up: try linear(p + "mlp.up_proj", out: c.intermediateSize, in: c.hiddenSize),
                down: try linear(p + "mlp.down_proj", out: c.hiddenSize, in: c.intermediateSize)))
        }
        let finalNorm = try tensor("model.norm.weight", [c.hiddenSize])
        let head: Matrix
        if c.tieWordEmbeddings || !source.contains("lm_head.weight") {
            head = embedding
        } else {
            head = try matrix("lm_head.weight", c.vocabularySize, c.hiddenSize)
        }
        self.init(config: c, embedding: embedding, blocks: blocks, finalNorm: finalNorm, head: head)
    }

    /// Every linear layer by module path (`model.layers.0.self_attn.q_proj`, ...).
    public var linearLayers: [Linear] { blocks.flatMap(\.linears) }
}

// MARK: - Inference forward with a KV cache

/// Keys and values of the tokens seen so far, per layer: [capacity, kvHeads·D].
public final class KVCache: @unchecked Sendable {
    public let capacity: Int
    public private(set) var length = 0
    let keys: [Matrix]
    let values: [Matrix]

    public init(config: LlamaConfig, capacity: Int) {
        self.capacity = capacity
        keys = (0..<config.layerCount).map { _ in Matrix(rows: capacity, columns: config.kvDim) }
        values = (0..<config.layerCount).map { _ in Matrix(rows: capacity, columns: config.kvDim) }
    }

    public func reset() { length = 0 }
    func advance(by n: Int) { length += n }
}

extension LlamaModel {
    /// Runs `tokens` after what `cache` holds and returns their logits, [T, vocab]
    /// (only the last row when `lastOnly`, as generation needs).
    public func forward(tokens: [Int], cache: KVCache, lastOnly: Bool = false) throws -> [Float] {
        let c = config
        let t = tokens.count
        let start = cache.length
        guard t > 0 else { return [] }
        guard start + t <= cache.capacity else {
            throw UsageError("the sequence needs \(start + t) positions but the KV cache holds \(cache.capacity)")
        }
        for id in tokens where id < 0 || id >= c.vocabularySize {
            throw UsageError("token id \(id) is outside the vocabulary (0..<\(c.vocabularySize))")
        }
        rope.grow(to: start + t)
        let h = c.hiddenSize
        let x = Matrix(rows: t, columns: h)          // residual stream
        let normed = Matrix(rows: t, columns: h)
        let q = Matrix(rows: t, columns: c.qDim)
        let attended = Matrix(rows: t, columns: c.qDim)
        let projected = Matrix(rows: t, columns: h)
        let gate = Matrix(rows: t, columns: c.intermediateSize)
        let up = Matrix(rows: t, columns: c.intermediateSize)
        let positions = (0..<t).map { Int32(start + $0) }

        for (i, id) in tokens.enumerated() {
            (x.pointer + i * h).update(from: embedding.pointer + id * h, count: h)
        }
        for (l, block) in blocks.enumerated() {
            let keys = cache.keys[l].pointer, values = cache.values[l].pointer
            let newKeys = keys + start * c.kvDim, newValues = values + start * c.kvDim
            block.inputNorm.withUnsafeBufferPointer {
                CPUOps.rmsNorm(x.pointer, weight: $0.baseAddress!, eps: c.rmsNormEps, rows: t, width: h, into: normed.pointer)
            }
            block.q.forward(normed.pointer, rows: t, into: q.pointer)
            block.k.forward(normed.pointer, rows: t, into: newKeys)
            block.v.forward(normed.pointer, rows: t, into: newValues)
            positions.withUnsafeBufferPointer { p in
                CPUOps.applyRope(q.pointer, positions: p.baseAddress!, rows: t, heads: c.headCount, headDim: c.headDim, table: rope)
                CPUOps.applyRope(newKeys, positions: p.baseAddress!, rows: t, heads: c.kvHeadCount, headDim: c.headDim, table: rope)
            }
            CPUOps.attention(q: q.pointer, keys: keys, values: values, rows: t, heads: c.headCount, kvHeads: c.kvHeadCount,
                             headDim: c.headDim, visible: { 0..<(start + $0 + 1) }, into: attended.pointer)
            block.o.forward(attended.pointer, rows: t, into: projected.pointer)
            for i in 0..<(t * h) { x.pointer[i] += projected.pointer[i] }

            block.postAttentionNorm.withUnsafeBufferPointer {
                CPUOps.rmsNorm(x.pointer, weight: $0.baseAddress!, eps: c.rmsNormEps, rows: t, width: h, into: normed.pointer)
            }
            block.gate.forward(normed.pointer, rows: t, into: gate.pointer)
            block.up.forward(normed.pointer, rows: t, into: up.pointer)
            CPUOps.swiglu(gate: gate.pointer, up: up.pointer, count: t * c.intermediateSize, into: gate.pointer)
            block.down.forward(gate.pointer, rows: t, into: projected.pointer)
            for i in 0..<(t * h) { x.pointer[i] += projected.pointer[i] }
        }
        cache.advance(by: t)

        let firstRow = lastOnly ? t - 1 : 0
        let rows = t - firstRow
        finalNorm.withUnsafeBufferPointer {
            CPUOps.rmsNorm(x.pointer + firstRow * h, weight: $0.baseAddress!, eps: c.rmsNormEps, rows: rows, width: h, into: normed.pointer)
        }
        var logits = [Float](repeating: 0, count: rows * c.vocabularySize)
        logits.withUnsafeMutableBufferPointer {
            CPUMatmul.gemmNT(normed.pointer, head.pointer, $0.baseAddress!, m: rows, n: c.vocabularySize, k: h)
        }
        return logits
    }
}
