// The Llama-family decoder on the CPU: embedding → N × (RMSNorm, attention, RMSNorm, SwiGLU MLP) → RMSNorm → head.
//
// Block, as transformers' LlamaDecoderLayer computes it:
//   h = x + o_proj(attention(rope(q_proj(norm1(x))), rope(k_proj(norm1(x))), v_proj(norm1(x))))
//   y = h + down_proj(silu(gate_proj(norm2(h))) * up_proj(norm2(h)))
// Phi-3 fuses the input projections: q | k | v = qkv_proj(norm1(x)) and gate | up = gate_up_proj(norm2(h)), split by
// columns in that order; rope rotates only the first rotaryDim dimensions of each head (partial rotary), with longrope's
// short or long factors.

/// One decoder block's weights.
public final class DecoderBlock: @unchecked Sendable {
    public let inputNorm: [Float]
    public let postAttentionNorm: [Float]
    /// The linears whose outputs, side by side, are q | k | v: q_proj, k_proj and v_proj, or Phi-3's one qkv_proj.
    public let attentionInput: [Linear]
    public let o: Linear
    /// The linears whose outputs, side by side, are gate | up: gate_proj and up_proj, or Phi-3's one gate_up_proj.
    public let mlpInput: [Linear]
    public let down: Linear

    /// A block with separate q, k, v, gate and up projections (Llama, Mistral, Qwen2).
    public init(inputNorm: [Float], postAttentionNorm: [Float], q: Linear, k: Linear, v: Linear, o: Linear, gate: Linear, up: Linear, down: Linear) {
        self.inputNorm = inputNorm
        self.postAttentionNorm = postAttentionNorm
        attentionInput = [q, k, v]
        self.o = o
        mlpInput = [gate, up]
        self.down = down
    }

    /// A block with Phi-3's fused projections: `qkv` [q + 2·kv, H] and `gateUp` [2·I, H].
    public init(inputNorm: [Float], postAttentionNorm: [Float], qkv: Linear, o: Linear, gateUp: Linear, down: Linear) {
        self.inputNorm = inputNorm
        self.postAttentionNorm = postAttentionNorm
        attentionInput = [qkv]
        self.o = o
        mlpInput = [gateUp]
        self.down = down
    }

    /// The separate projections of a Llama-layout block. A fused (Phi-3) block has none of them: code that handles
    /// both reads `attentionInput` and `mlpInput`; code that handles only the separate layout refuses fused models first.
    public var q: Linear { separate(attentionInput, 0, "q_proj") }
    public var k: Linear { separate(attentionInput, 1, "k_proj") }
    public var v: Linear { separate(attentionInput, 2, "v_proj") }
    public var gate: Linear { separate(mlpInput, 0, "gate_proj") }
    public var up: Linear { separate(mlpInput, 1, "up_proj") }

    private func separate(_ group: [Linear], _ i: Int, _ name: String) -> Linear {
        precondition(group.count > 1, "\(name) asked of a block with fused projections (\(group[0].name))")
        return group[i]
    }

    /// Every projection: q, k, v, o, gate, up, down (the seven of a Llama block, in the order PEFT lists them), or
    /// Phi-3's qkv, o, gate_up, down.
    public var linears: [Linear] { attentionInput + [o] + mlpInput + [down] }

    /// Runs a projection group (`attentionInput` or `mlpInput`) on x [rows, in] into `parts` ([rows, width] each):
    /// separate linears write their own part; a fused one writes all parts side by side, which are then split.
    static func forward(_ group: [Linear], _ x: UnsafePointer<Float>, rows: Int, into parts: [(UnsafeMutablePointer<Float>, Int)]) {
        if group.count == parts.count {
            for (layer, part) in zip(group, parts) { layer.forward(x, rows: rows, into: part.0) }
            return
        }
        precondition(group.count == 1, "a projection group is one fused linear or one linear per part")
        let fused = Matrix(rows: rows, columns: group[0].outFeatures)
        group[0].forward(x, rows: rows, into: fused.pointer)
        CPUOps.splitColumns(fused.pointer, rows: rows, into: parts)
    }
}

/// Where a model's frozen base weights come from: a dense checkpoint, or a 4-bit one dequantized on load.
public protocol BaseWeightSource {
    /// The directory or file the weights were read from, for messages.
    var origin: String { get }
    func contains(_ name: String) -> Bool
    /// A tensor's values in fp32 with its shape, checked finite: a NaN or ±Inf is an error naming the tensor.
    func tensor(_ name: String) throws -> (values: [Float], shape: [Int])
    /// The 4-bit form of a linear weight, when the source holds (or makes) one; nil for dense weights.
    /// Its scales are checked finite (the codes cannot be otherwise).
    func quantizedWeight(_ name: String) throws -> QuantizedWeight?
    /// Every weight's name as the model names it (a 4-bit weight once, under its dense name).
    var tensorNames: [String] { get }
}

extension BaseWeightSource {
    public func quantizedWeight(_ name: String) throws -> QuantizedWeight? { nil }
}

extension SafeTensorsCheckpoint: BaseWeightSource {
    public var origin: String { directory }
    public var tensorNames: [String] { names }
    public func tensor(_ name: String) throws -> (values: [Float], shape: [Int]) {
        guard let info = info(name) else { throw FileFormatError(file: directory, place: "tensor '\(name)'", "not found in the checkpoint") }
        let file = try file(containing: name)
        var values = [Float](repeating: 0, count: info.elementCount)
        let bad = values.withUnsafeMutableBufferPointer { convertToFiniteFloats(file.bytes(info), dtype: info.dtype, into: $0) }
        if let i = bad { throw nonFiniteError(values[i], at: i, tensor: name, origin: file.path) }
        return (values, info.shape)
    }
}

/// A Llama-family (or Phi-3) model with its weights in fp32 on the CPU.
public final class DecoderModel: @unchecked Sendable {
    public let config: DecoderConfig
    public let embedding: Matrix          // [vocab, H]
    public let blocks: [DecoderBlock]
    public let finalNorm: [Float]         // [H]
    /// The output head, [vocab, H]; the embedding itself when tied.
    public let head: Matrix
    public let rope: RopeTable

    public init(config: DecoderConfig, embedding: Matrix, blocks: [DecoderBlock], finalNorm: [Float], head: Matrix) {
        self.config = config
        self.embedding = embedding
        self.blocks = blocks
        self.finalNorm = finalNorm
        self.head = head
        rope = RopeTable(config: config, positions: min(config.maxPositionEmbeddings, 4096))
    }

    /// Loads the weights named as transformers names them from `source`, checking each against the
    /// config: every tensor the model needs present with its shape and finite values, and no tensor
    /// left over (a layer beyond `num_hidden_layers`, a bias the config does not enable).
    public convenience init(config: DecoderConfig, weights source: BaseWeightSource) throws {
        let c = config
        let expected = Self.tensorShapes(config: c)
        func tensor(_ name: String) throws -> [Float] {
            let shape = expected[name]!
            guard source.contains(name) else {
                throw FileFormatError(file: source.origin, place: "tensor '\(name)'", "missing: config.json describes a model that needs it (shape \(shape))")
            }
            let (values, actual) = try source.tensor(name)
            guard actual == shape else {
                throw FileFormatError(file: source.origin, place: "tensor '\(name)'", "shape \(actual), expected \(shape) from config.json")
            }
            return values
        }
        func matrix(_ name: String) throws -> Matrix {
            let shape = expected[name]!
            return Matrix(rows: shape[0], columns: shape[1], values: try tensor(name))
        }
        func linear(_ module: String) throws -> Linear {
            let name = module + ".weight"
            let weight: FrozenWeight
            if let q = try source.quantizedWeight(name) {
                guard q.shape == expected[name]! else {
                    throw FileFormatError(file: source.origin, place: "tensor '\(name)'", "shape \(q.shape), expected \(expected[name]!) from config.json")
                }
                weight = try FrozenWeight(quantized: q)
            } else {
                weight = FrozenWeight(dense: try matrix(name))
            }
            let bias = module + ".bias"
            return Linear(name: module, weight: weight, bias: expected[bias] != nil ? try tensor(bias) : nil)
        }
        let embedding = try matrix("model.embed_tokens.weight")
        var blocks: [DecoderBlock] = []
        for l in 0..<c.layerCount {
            let p = "model.layers.\(l)."
            let inputNorm = try tensor(p + "input_layernorm.weight"), postAttentionNorm = try tensor(p + "post_attention_layernorm.weight")
            if c.fusedProjections {
                blocks.append(DecoderBlock(
                    inputNorm: inputNorm, postAttentionNorm: postAttentionNorm,
                    qkv: try linear(p + "self_attn.qkv_proj"), o: try linear(p + "self_attn.o_proj"),
                    gateUp: try linear(p + "mlp.gate_up_proj"), down: try linear(p + "mlp.down_proj")))
            } else {
                blocks.append(DecoderBlock(
                    inputNorm: inputNorm, postAttentionNorm: postAttentionNorm,
                    q: try linear(p + "self_attn.q_proj"), k: try linear(p + "self_attn.k_proj"),
                    v: try linear(p + "self_attn.v_proj"), o: try linear(p + "self_attn.o_proj"),
                    gate: try linear(p + "mlp.gate_proj"), up: try linear(p + "mlp.up_proj"), down: try linear(p + "mlp.down_proj")))
            }
        }
        let finalNorm = try tensor("model.norm.weight")
        let head: Matrix
        if c.tieWordEmbeddings {
            head = embedding
        } else if source.contains("lm_head.weight") {
            head = try matrix("lm_head.weight")
        } else {
            throw FileFormatError(file: source.origin, place: "tensor 'lm_head.weight'",
                                  "missing, and config.json has tie_word_embeddings false (set it to true if the head is the embedding)")
        }
        try Self.checkNoTensorIsLeftOver(source, expected: expected, config: c)
        self.init(config: c, embedding: embedding, blocks: blocks, finalNorm: finalNorm, head: head)
    }

    /// Every tensor a model of `config` reads, with its shape, by transformers' name.
    public static func tensorShapes(config c: DecoderConfig) -> [String: [Int]] {
        var shapes: [String: [Int]] = ["model.embed_tokens.weight": [c.vocabularySize, c.hiddenSize], "model.norm.weight": [c.hiddenSize]]
        if !c.tieWordEmbeddings { shapes["lm_head.weight"] = [c.vocabularySize, c.hiddenSize] }
        for l in 0..<c.layerCount {
            let p = "model.layers.\(l)."
            shapes[p + "input_layernorm.weight"] = [c.hiddenSize]
            shapes[p + "post_attention_layernorm.weight"] = [c.hiddenSize]
            if c.fusedProjections {
                shapes[p + "self_attn.qkv_proj.weight"] = [c.qDim + 2 * c.kvDim, c.hiddenSize]
                shapes[p + "self_attn.o_proj.weight"] = [c.hiddenSize, c.qDim]
                shapes[p + "mlp.gate_up_proj.weight"] = [2 * c.intermediateSize, c.hiddenSize]
                shapes[p + "mlp.down_proj.weight"] = [c.hiddenSize, c.intermediateSize]
                continue
            }
            for (name, out, inFeatures) in [("self_attn.q_proj", c.qDim, c.hiddenSize), ("self_attn.k_proj", c.kvDim, c.hiddenSize),
                                            ("self_attn.v_proj", c.kvDim, c.hiddenSize), ("self_attn.o_proj", c.hiddenSize, c.qDim),
                                            ("mlp.gate_proj", c.intermediateSize, c.hiddenSize), ("mlp.up_proj", c.intermediateSize, c.hiddenSize),
                                            ("mlp.down_proj", c.hiddenSize, c.intermediateSize)] {
                shapes[p + name + ".weight"] = [out, inFeatures]
                if c.attentionBias, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"].contains(name) { shapes[p + name + ".bias"] = [out] }
            }
        }
        return shapes
    }

    /// A tensor the model does not read means config.json and the weights disagree (transformers would
    /// only warn); the few that carry nothing are allowed: a tied head's copy, old rotary caches.
    static func checkNoTensorIsLeftOver(_ source: BaseWeightSource, expected: [String: [Int]], config c: DecoderConfig) throws {
        for name in source.tensorNames where expected[name] == nil {
            if name == "lm_head.weight" && c.tieWordEmbeddings { continue }
            if name.hasSuffix(".rotary_emb.inv_freq") { continue }
            let why: String
            if let layer = layerIndex(of: name), layer >= c.layerCount {
                why = "layer \(layer), but config.json has num_hidden_layers \(c.layerCount) (the checkpoint holds more layers than the config describes)"
            } else if name.hasSuffix(".bias") {
                why = "a bias that config.json does not enable (attention_bias, mlp_bias) and this code does not compute"
            } else {
                why = "not a weight of a \(c.modelType) model with this config.json"
            }
            throw FileFormatError(file: source.origin, place: "tensor '\(name)'", why)
        }
    }

    /// N of a `model.layers.N.…` name.
    static func layerIndex(of name: String) -> Int? {
        let parts = name.split(separator: ".")
        guard parts.count > 2, parts[0] == "model", parts[1] == "layers" else { return nil }
        return Int(parts[2])
    }

    /// Every linear layer by module path (`model.layers.0.self_attn.q_proj`, ...).
    public var linearLayers: [Linear] { blocks.flatMap(\.linears) }

    /// The module names of a block's projections (`q_proj`, ..., or Phi-3's `qkv_proj`, ...), for messages.
    public var projectionNames: [String] { (blocks.first?.linears ?? []).map { String($0.name.split(separator: ".").last ?? "") } }
}

// MARK: - Inference forward with a KV cache

/// Keys and values of the tokens seen so far, per layer: [capacity, kvHeads·D].
public final class KVCache: @unchecked Sendable {
    public let capacity: Int
    public private(set) var length = 0
    let keys: [Matrix]
    let values: [Matrix]
    /// The tokens the cache holds, so that it can be recomputed (longrope's switch to the long factors).
    private(set) var tokens: [Int] = []
    /// Whether the keys were rotated with longrope's long factors.
    fileprivate(set) var usesLongRopeFactors = false

    public init(config: DecoderConfig, capacity: Int) {
        self.capacity = capacity
        keys = (0..<config.layerCount).map { _ in Matrix(rows: capacity, columns: config.kvDim) }
        values = (0..<config.layerCount).map { _ in Matrix(rows: capacity, columns: config.kvDim) }
    }

    public func reset() { length = 0; tokens = []; usesLongRopeFactors = false }
    func advance(with new: [Int]) { length += new.count; tokens += new }
}

extension DecoderModel {
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
        try c.checkSequenceLength(start + t, what: "the input")
        for id in tokens where id < 0 || id >= c.vocabularySize {
            throw UsageError("token id \(id) is outside the vocabulary (0..<\(c.vocabularySize))")
        }
        let longRope = c.usesLongRopeFactors(sequenceLength: start + t)
        if longRope && !cache.usesLongRopeFactors && start > 0 {
            // The cached keys were rotated with the short factors. transformers' Phi-3 generation drops its cache when
            // the sequence first passes original_max_position_embeddings and recomputes it all with the long factors.
            let all = cache.tokens + tokens
            cache.reset()
            let logits = try forward(tokens: all, cache: cache, lastOnly: lastOnly)
            return lastOnly ? logits : Array(logits.suffix(t * c.vocabularySize))
        }
        cache.usesLongRopeFactors = longRope
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
            DecoderBlock.forward(block.attentionInput, normed.pointer, rows: t, into: [(q.pointer, c.qDim), (newKeys, c.kvDim), (newValues, c.kvDim)])
            positions.withUnsafeBufferPointer { p in
                CPUOps.applyRope(q.pointer, positions: p.baseAddress!, rows: t, heads: c.headCount, headDim: c.headDim, table: rope, long: longRope)
                CPUOps.applyRope(newKeys, positions: p.baseAddress!, rows: t, heads: c.kvHeadCount, headDim: c.headDim, table: rope, long: longRope)
            }
            CPUOps.attention(q: q.pointer, keys: keys, values: values, rows: t, heads: c.headCount, kvHeads: c.kvHeadCount,
                             headDim: c.headDim, visible: { 0..<(start + $0 + 1) }, into: attended.pointer)
            block.o.forward(attended.pointer, rows: t, into: projected.pointer)
            for i in 0..<(t * h) { x.pointer[i] += projected.pointer[i] }

            block.postAttentionNorm.withUnsafeBufferPointer {
                CPUOps.rmsNorm(x.pointer, weight: $0.baseAddress!, eps: c.rmsNormEps, rows: t, width: h, into: normed.pointer)
            }
            DecoderBlock.forward(block.mlpInput, normed.pointer, rows: t, into: [(gate.pointer, c.intermediateSize), (up.pointer, c.intermediateSize)])
            CPUOps.swiglu(gate: gate.pointer, up: up.pointer, count: t * c.intermediateSize, into: gate.pointer)
            block.down.forward(gate.pointer, rows: t, into: projected.pointer)
            for i in 0..<(t * h) { x.pointer[i] += projected.pointer[i] }
        }
        cache.advance(with: tokens)

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

// MARK: - Finite values

/// Throws when a weight holds NaN or ±Inf, naming the tensor and the first bad element; such a weight
/// would give a NaN loss, or quantize to blocks of zeros.
func checkFinite(_ values: [Float], tensor name: String, origin: String) throws {
    guard let i = values.withUnsafeBufferPointer(firstNonFiniteIndex) else { return }
    throw nonFiniteError(values[i], at: i, tensor: name, origin: origin)
}

func nonFiniteError(_ value: Float, at i: Int, tensor name: String, origin: String) -> FileFormatError {
    FileFormatError(file: origin, place: "tensor '\(name)'", "element \(i) is \(value); weights must be finite")
}

/// `convertToFloat` a cache-sized piece at a time, each piece checked while it is still in cache, so
/// the check costs little beside the conversion. Returns the index of the first non-finite value.
func convertToFiniteFloats(_ bytes: UnsafeRawBufferPointer, dtype: DType, into out: UnsafeMutableBufferPointer<Float>) -> Int? {
    let chunk = 1 << 14
    var first: Int?
    var start = 0
    while start < out.count {
        let end = min(start + chunk, out.count)
        let piece = UnsafeMutableBufferPointer(rebasing: out[start..<end])
        convertToFloat(UnsafeRawBufferPointer(rebasing: bytes[(start * dtype.size)..<(end * dtype.size)]), dtype: dtype, into: piece)
        if first == nil, let i = firstNonFiniteIndex(UnsafeBufferPointer(piece)) { first = start + i }
        start = end
    }
    return first
}

/// The index of the first NaN or ±Inf, nil when all are finite. Exponent bits all ones mark
/// non-finite floats; a max over them is an integer reduction the compiler vectorizes.
func firstNonFiniteIndex(_ values: UnsafeBufferPointer<Float>) -> Int? {
    let exponent: UInt32 = 0x7F80_0000
    let chunk = 1 << 14
    var start = 0
    while start < values.count {
        let end = min(start + chunk, values.count)
        var highest: UInt32 = 0
        for i in start..<end { highest = max(highest, values[i].bitPattern & exponent) }
        if highest == exponent { return (start..<end).first { !values[$0].isFinite } }
        start = end
    }
    return nil
}
