// The decoder on the CPU: embedding → N × block → RMSNorm → head, with the variations DecoderConfig describes.
//
// Block, as transformers' LlamaDecoderLayer computes it (and Gemma2/Gemma3/Qwen3DecoderLayer, in brackets):
//   a = attention(rope([q_norm](q_proj(n1(x)))), rope([k_norm](k_proj(n1(x)))), v_proj(n1(x)))
//   h = x + [attention-output norm](o_proj(a))
//   y = h + [MLP-output norm](down_proj(act(gate_proj(n2(h))) * up_proj(n2(h))))
// n1 is `input_layernorm`; n2 is Llama's `post_attention_layernorm` and Gemma's `pre_feedforward_layernorm`
// (Gemma's `post_attention_layernorm` is the attention-output norm, its `post_feedforward_layernorm` the MLP's).
// Phi-3 fuses the input projections: q | k | v = qkv_proj(n1(x)) and gate | up = gate_up_proj(n2(h)), split by
// columns in that order; rope rotates only the first rotaryDim dimensions of each head (partial rotary), with longrope's
// short or long factors.

/// One decoder block's weights. Norm weights are kept as stored (Gemma's are the w of x·(1 + w)).
public final class DecoderBlock: @unchecked Sendable {
    /// `input_layernorm`: before attention.
    public let inputNorm: [Float]
    /// Before the MLP: Llama's `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`.
    public let mlpInputNorm: [Float]
    /// Gemma's sandwich norms: on the attention output (its `post_attention_layernorm`) and on the MLP output
    /// (`post_feedforward_layernorm`); nil elsewhere.
    public let attentionOutputNorm: [Float]?
    public let mlpOutputNorm: [Float]?
    /// Per-head RMSNorm of q and k before RoPE (`self_attn.q_norm`, `self_attn.k_norm`), [head_dim]; nil elsewhere.
    public let qNorm: [Float]?
    public let kNorm: [Float]?
    /// The linears whose outputs, side by side, are q | k | v: q_proj, k_proj and v_proj, or Phi-3's one qkv_proj.
    public let attentionInput: [Linear]
    public let o: Linear
    /// The linears whose outputs, side by side, are gate | up: gate_proj and up_proj, or Phi-3's one gate_up_proj.
    public let mlpInput: [Linear]
    public let down: Linear

    /// A block with separate q, k, v, gate and up projections (Llama, Mistral, Qwen, Gemma).
    public convenience init(inputNorm: [Float], mlpInputNorm: [Float], attentionOutputNorm: [Float]? = nil, mlpOutputNorm: [Float]? = nil,
                            qNorm: [Float]? = nil, kNorm: [Float]? = nil,
                            q: Linear, k: Linear, v: Linear, o: Linear, gate: Linear, up: Linear, down: Linear) {
        self.init(inputNorm: inputNorm, mlpInputNorm: mlpInputNorm, attentionOutputNorm: attentionOutputNorm, mlpOutputNorm: mlpOutputNorm,
                  qNorm: qNorm, kNorm: kNorm, attentionInput: [q, k, v], o: o, mlpInput: [gate, up], down: down)
    }

    /// A block with Phi-3's fused projections: `qkv` [q + 2·kv, H] and `gateUp` [2·I, H].
    public convenience init(inputNorm: [Float], mlpInputNorm: [Float], qkv: Linear, o: Linear, gateUp: Linear, down: Linear) {
        self.init(inputNorm: inputNorm, mlpInputNorm: mlpInputNorm, attentionOutputNorm: nil, mlpOutputNorm: nil,
                  qNorm: nil, kNorm: nil, attentionInput: [qkv], o: o, mlpInput: [gateUp], down: down)
    }

    init(inputNorm: [Float], mlpInputNorm: [Float], attentionOutputNorm: [Float]?, mlpOutputNorm: [Float]?,
         qNorm: [Float]?, kNorm: [Float]?, attentionInput: [Linear], o: Linear, mlpInput: [Linear], down: Linear) {
        precondition(attentionInput.count == 1 || attentionInput.count == 3, "q | k | v come from one fused linear or three")
        precondition(mlpInput.count == 1 || mlpInput.count == 2, "gate | up come from one fused linear or two")
        self.inputNorm = inputNorm
        self.mlpInputNorm = mlpInputNorm
        self.attentionOutputNorm = attentionOutputNorm
        self.mlpOutputNorm = mlpOutputNorm
        self.qNorm = qNorm
        self.kNorm = kNorm
        self.attentionInput = attentionInput
        self.o = o
        self.mlpInput = mlpInput
        self.down = down
    }

    /// The separate projections of a Llama-layout block; nil on a fused (Phi-3) block, whose code reads
    /// `attentionInput` and `mlpInput`.
    public var q: Linear? { attentionInput.count == 3 ? attentionInput[0] : nil }
    public var k: Linear? { attentionInput.count == 3 ? attentionInput[1] : nil }
    public var v: Linear? { attentionInput.count == 3 ? attentionInput[2] : nil }
    public var gate: Linear? { mlpInput.count == 2 ? mlpInput[0] : nil }
    public var up: Linear? { mlpInput.count == 2 ? mlpInput[1] : nil }

    /// Every projection: q, k, v, o, gate, up, down (the seven of a Llama block, in the order PEFT lists them), or
    /// Phi-3's qkv, o, gate_up, down.
    public var linears: [Linear] { attentionInput + [o] + mlpInput + [down] }

    /// Each norm weight with its tensor name within the layer (`input_layernorm.weight`, ...), in the family's naming.
    public func namedNorms(sandwich: Bool) -> [(String, [Float])] {
        var norms: [(String, [Float])] = [("input_layernorm.weight", inputNorm)]
        if sandwich, let attentionOutputNorm, let mlpOutputNorm {
            norms += [("post_attention_layernorm.weight", attentionOutputNorm), ("pre_feedforward_layernorm.weight", mlpInputNorm),
                      ("post_feedforward_layernorm.weight", mlpOutputNorm)]
        } else {
            norms.append(("post_attention_layernorm.weight", mlpInputNorm))
        }
        if let qNorm, let kNorm { norms += [("self_attn.q_norm.weight", qNorm), ("self_attn.k_norm.weight", kNorm)] }
        return norms
    }

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

/// A decoder-only model with its weights in fp32 on the CPU.
public final class DecoderModel: @unchecked Sendable {
    public let config: DecoderConfig
    public let embedding: Matrix          // [vocab, H]
    public let blocks: [DecoderBlock]
    public let finalNorm: [Float]         // [H]
    /// The output head, [vocab, H]; the embedding itself when tied.
    public let head: Matrix
    /// cos/sin of the full-attention layers' RoPE, and of the sliding layers' when it differs (Gemma 3).
    public let rope: RopeTable
    let slidingRope: RopeTable?
    /// Set when the ranks hold the blocks' base weights in shards (Parallel/ShardedBase.swift): training and
    /// evaluation gather each block around its use.
    public internal(set) var shardedBase: ShardedDecoderBase?
    /// Set when the ranks share the head's loss by vocabulary (Parallel/VocabularyParallelLoss.swift): each rank computes
    /// the logits of its slice of the vocabulary for every rank's tokens. Every rank then makes every forward together.
    public internal(set) var vocabularyParallel: Collective?

    public init(config: DecoderConfig, embedding: Matrix, blocks: [DecoderBlock], finalNorm: [Float], head: Matrix) {
        self.config = config
        self.embedding = embedding
        self.blocks = blocks
        self.finalNorm = finalNorm
        self.head = head
        let positions = min(config.maxPositionEmbeddings, 4096)
        rope = RopeTable(config: config, positions: positions)
        slidingRope = config.slidingRope.map { RopeTable(config: config, rope: $0, positions: positions) }
    }

    /// The RoPE table of layer `l`.
    func ropeTable(layer l: Int) -> RopeTable {
        if let slidingRope, case .sliding = config.layerAttention[l] { return slidingRope }
        return rope
    }

    /// Makes room for positions < `count` in every RoPE table.
    func growRope(to count: Int) {
        rope.grow(to: count)
        slidingRope?.grow(to: count)
    }

    /// Loads the weights named as transformers names them from `source`, checking each against the
    /// config: every tensor the model needs present with its shape and finite values, and no tensor
    /// left over (a layer beyond `num_hidden_layers`, a bias the config does not enable).
    public convenience init(config: DecoderConfig, weights source: BaseWeightSource) throws {
        let c = config
        let expected = Self.tensorShapes(config: c)
        /// The name the checkpoint holds a module tensor under (Gemma 3 multimodal files use an older layout).
        func stored(_ name: String) -> String {
            if source.contains(name) { return name }
            let alternative = c.checkpointName(name)
            return source.contains(alternative) ? alternative : name
        }
        func tensor(_ name: String) throws -> [Float] {
            let shape = expected[name]!
            let file = stored(name)
            guard source.contains(file) else {
                throw FileFormatError(file: source.origin, place: "tensor '\(name)'", "missing: config.json describes a model that needs it (shape \(shape))")
            }
            let (values, actual) = try source.tensor(file)
            guard actual == shape else {
                throw FileFormatError(file: source.origin, place: "tensor '\(file)'", "shape \(actual), expected \(shape) from config.json")
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
            if let q = try source.quantizedWeight(stored(name)) {
                guard q.shape == expected[name]! else {
                    throw FileFormatError(file: source.origin, place: "tensor '\(stored(name))'", "shape \(q.shape), expected \(expected[name]!) from config.json")
                }
                weight = try FrozenWeight(quantized: q)
            } else {
                weight = FrozenWeight(dense: try matrix(name))
            }
            let bias = module + ".bias"
            return Linear(name: module, weight: weight, bias: expected[bias] != nil ? try tensor(bias) : nil)
        }
        let embedding = try matrix(c.modulePrefix + "embed_tokens.weight")
        var blocks: [DecoderBlock] = []
        for l in 0..<c.layerCount {
            let p = c.layerPrefix(l)
            let sandwich = c.sandwichNorms
            let inputNorm = try tensor(p + "input_layernorm.weight")
            let mlpInputNorm = try tensor(p + (sandwich ? "pre_feedforward_layernorm.weight" : "post_attention_layernorm.weight"))
            if c.fusedProjections {
                blocks.append(DecoderBlock(
                    inputNorm: inputNorm, mlpInputNorm: mlpInputNorm,
                    qkv: try linear(p + "self_attn.qkv_proj"), o: try linear(p + "self_attn.o_proj"),
                    gateUp: try linear(p + "mlp.gate_up_proj"), down: try linear(p + "mlp.down_proj")))
                continue
            }
            blocks.append(DecoderBlock(
                inputNorm: inputNorm, mlpInputNorm: mlpInputNorm,
                attentionOutputNorm: sandwich ? try tensor(p + "post_attention_layernorm.weight") : nil,
                mlpOutputNorm: sandwich ? try tensor(p + "post_feedforward_layernorm.weight") : nil,
                qNorm: c.qkNorm ? try tensor(p + "self_attn.q_norm.weight") : nil,
                kNorm: c.qkNorm ? try tensor(p + "self_attn.k_norm.weight") : nil,
                q: try linear(p + "self_attn.q_proj"), k: try linear(p + "self_attn.k_proj"),
                v: try linear(p + "self_attn.v_proj"), o: try linear(p + "self_attn.o_proj"),
                gate: try linear(p + "mlp.gate_proj"), up: try linear(p + "mlp.up_proj"), down: try linear(p + "mlp.down_proj")))
        }
        let finalNorm = try tensor(c.modulePrefix + "norm.weight")
        let head: Matrix
        if c.tieWordEmbeddings {
            head = embedding
        } else if source.contains(stored("lm_head.weight")) {
            head = try matrix("lm_head.weight")
        } else {
            throw FileFormatError(file: source.origin, place: "tensor '\(c.headTensorName)'",
                                  "missing, and config.json has tie_word_embeddings false (set it to true if the head is the embedding)")
        }
        try Self.checkNoTensorIsLeftOver(source, expected: expected, config: c)
        self.init(config: c, embedding: embedding, blocks: blocks, finalNorm: finalNorm, head: head)
    }

    /// Every tensor a model of `config` reads, with its shape, by its module path as transformers names it
    /// (`DecoderConfig.checkpointName` gives the name in an older file layout).
    public static func tensorShapes(config c: DecoderConfig) -> [String: [Int]] {
        var shapes: [String: [Int]] = [c.modulePrefix + "embed_tokens.weight": [c.vocabularySize, c.hiddenSize],
                                       c.modulePrefix + "norm.weight": [c.hiddenSize]]
        if !c.tieWordEmbeddings { shapes["lm_head.weight"] = [c.vocabularySize, c.hiddenSize] }
        for l in 0..<c.layerCount {
            let p = c.layerPrefix(l)
            for norm in c.normTensorNames { shapes[p + norm] = [c.hiddenSize] }
            if c.qkNorm {
                shapes[p + "self_attn.q_norm.weight"] = [c.headDim]
                shapes[p + "self_attn.k_norm.weight"] = [c.headDim]
            }
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
    /// only warn); the few that carry nothing are allowed: a tied head's copy, old rotary caches, and a
    /// multimodal checkpoint's vision tower and projector (only its text model is used).
    static func checkNoTensorIsLeftOver(_ source: BaseWeightSource, expected: [String: [Int]], config c: DecoderConfig) throws {
        for stored in source.tensorNames {
            let name = c.moduleName(ofCheckpointTensor: stored)
            if expected[name] != nil { continue }
            if name == "lm_head.weight" && c.tieWordEmbeddings { continue }
            if name.hasSuffix(".rotary_emb.inv_freq") { continue }
            if c.modulePrefix != "model.", c.isOutsideTextModel(stored) { continue }
            let why: String
            if let layer = layerIndex(of: name), layer >= c.layerCount {
                why = "layer \(layer), but config.json has num_hidden_layers \(c.layerCount) (the checkpoint holds more layers than the config describes)"
            } else if name.hasSuffix(".bias") {
                why = "a bias that config.json does not enable (attention_bias, mlp_bias) and this code does not compute"
            } else {
                why = "not a weight of a \(c.modelType) model with this config.json"
            }
            throw FileFormatError(file: source.origin, place: "tensor '\(stored)'", why)
        }
    }

    /// N of a `….layers.N.…` name (`model.layers.N`, `model.language_model.layers.N`, `language_model.model.layers.N`).
    static func layerIndex(of name: String) -> Int? {
        let parts = name.split(separator: ".")
        for prefix in [["model", "layers"], ["model", "language_model", "layers"], ["language_model", "model", "layers"]]
        where parts.count > prefix.count && Array(parts.prefix(prefix.count)).elementsEqual(prefix.map { Substring($0) }) {
            return Int(parts[prefix.count])
        }
        return nil
    }

    /// Every linear layer by module path (`model.layers.0.self_attn.q_proj`, ...).
    public var linearLayers: [Linear] { blocks.flatMap(\.linears) }

    /// The module names of a block's projections (`q_proj`, ..., or Phi-3's `qkv_proj`, ...), for messages.
    public var projectionNames: [String] { (blocks.first?.linears ?? []).map { String($0.name.split(separator: ".").last ?? "") } }
}

extension DecoderConfig {
    /// The module path of layer `l` with a trailing dot: `model.layers.l.` (or under `model.language_model.`).
    public func layerPrefix(_ l: Int) -> String { modulePrefix + "layers.\(l)." }

    /// The hidden-size norms of a layer, by tensor name within it.
    public var normTensorNames: [String] {
        sandwichNorms
            ? ["input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"]
            : ["input_layernorm.weight", "post_attention_layernorm.weight"]
    }

    /// A module tensor's name in the checkpoint files' layout (the same name unless the text model sits
    /// elsewhere in them: `language_model.model.…` and `language_model.lm_head.weight` for Gemma 3 multimodal).
    public func checkpointName(_ moduleName: String) -> String {
        if moduleName == "lm_head.weight" { return headTensorName }
        guard moduleName.hasPrefix(modulePrefix) else { return moduleName }
        return checkpointPrefix + moduleName.dropFirst(modulePrefix.count)
    }

    /// The inverse of `checkpointName`.
    public func moduleName(ofCheckpointTensor name: String) -> String {
        if name == headTensorName { return "lm_head.weight" }
        guard name.hasPrefix(checkpointPrefix) else { return name }
        return modulePrefix + name.dropFirst(checkpointPrefix.count)
    }

    /// A multimodal checkpoint's tensors beside the text model (vision tower, projector), in either layout.
    public func isOutsideTextModel(_ name: String) -> Bool {
        ["vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."].contains { name.hasPrefix($0) }
    }
}

// MARK: - Inference forward with a KV cache

/// Keys and values of the tokens seen so far, per layer. A full-attention layer holds every position, [capacity,
/// kvHeads·D]; a sliding layer holds only its window, [min(window, capacity), kvHeads·D], as a ring: position p at row
/// p mod rows (no query ever looks further back, so memory stays bounded by the window however long the sequence).
public final class KVCache: @unchecked Sendable {
    public let capacity: Int
    public private(set) var length = 0
    /// Rows each layer holds: `capacity`, or min(window, capacity) on a sliding layer.
    public let layerRows: [Int]
    let keys: [Matrix]
    let values: [Matrix]
    /// The tokens the cache holds, so that it can be recomputed (longrope's switch to the long factors).
    private(set) var tokens: [Int] = []
    /// Whether the keys were rotated with longrope's long factors.
    fileprivate(set) var usesLongRopeFactors = false

    /// `slidingRing` false keeps every position on the sliding layers too (masked to the window as with the ring): the
    /// reference the ring is tested against.
    public init(config: DecoderConfig, capacity: Int, slidingRing: Bool = true) {
        self.capacity = capacity
        layerRows = config.layerAttention.map { slidingRing ? $0.cacheRows(capacity: capacity) : capacity }
        keys = layerRows.map { Matrix(rows: $0, columns: config.kvDim) }
        values = layerRows.map { Matrix(rows: $0, columns: config.kvDim) }
    }

    /// Key and value rows held over all layers (each row kvHeads·D values).
    public var rowCount: Int { layerRows.reduce(0, +) }

    public func reset() { length = 0; tokens = []; usesLongRopeFactors = false }
    func advance(with new: [Int]) { length += new.count; tokens += new }

    /// Whether layer `l` is a ring (a sliding window shorter than the capacity).
    func isRing(_ l: Int) -> Bool { layerRows[l] < capacity }

    /// Copies layer `l`'s keys and values of `positions` (held by the ring) into consecutive rows of `keys`/`values`.
    func gather(layer l: Int, positions: Range<Int>, keys k: UnsafeMutablePointer<Float>, values v: UnsafeMutablePointer<Float>) {
        let width = self.keys[l].columns, rows = layerRows[l]
        precondition(positions.lowerBound >= length - rows && positions.upperBound <= length, "positions \(positions) left the ring")
        for (i, p) in positions.enumerated() {
            (k + i * width).update(from: self.keys[l].pointer + (p % rows) * width, count: width)
            (v + i * width).update(from: self.values[l].pointer + (p % rows) * width, count: width)
        }
    }

    /// Stores consecutive rows of `keys`/`values` as layer `l`'s positions `positions` (at most the ring's rows).
    func store(layer l: Int, positions: Range<Int>, keys k: UnsafePointer<Float>, values v: UnsafePointer<Float>) {
        let width = self.keys[l].columns, rows = layerRows[l]
        precondition(positions.count <= rows, "\(positions.count) positions into a ring of \(rows)")
        for (i, p) in positions.enumerated() {
            (self.keys[l].pointer + (p % rows) * width).update(from: k + i * width, count: width)
            (self.values[l].pointer + (p % rows) * width).update(from: v + i * width, count: width)
        }
    }
}

extension AttentionKind {
    /// Positions a KV cache of `capacity` keeps for this kind of layer: all of them, or the last `window`.
    public func cacheRows(capacity: Int) -> Int {
        switch self {
        case .full: return capacity
        case .sliding(let window): return min(window, capacity)
        }
    }
}

extension DecoderConfig {
    /// Bytes of the KV caches of `slots` sequences of up to `capacity` positions, `bytesPerValue` per value (2 on the
    /// GPU, bf16 or fp16; 4 on the CPU): keys and values of every layer, a sliding layer holding only its window.
    public func kvCacheBytes(capacity: Int, slots: Int = 1, bytesPerValue: Int = 2) -> Int {
        layerAttention.reduce(0) { $0 + 2 * slots * $1.cacheRows(capacity: capacity) * kvDim * bytesPerValue }
    }
}

extension DecoderModel {
    /// Runs `tokens` after what `cache` holds and returns their logits, [T, vocab]
    /// (only the last row when `lastOnly`, as generation needs). Sliding-window layers attend within their
    /// window here too, and their cache is a ring of the window's rows: the chunk's queries attend over a window view,
    /// the ring's last `window − 1` positions gathered in position order followed by the chunk's own keys (so the sums
    /// run in the order of a cache that kept every position), and the chunk's last `window` keys then go into the ring.
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
        growRope(to: start + t)
        let h = c.hiddenSize
        let offset = c.normWeightOffset
        let x = Matrix(rows: t, columns: h)          // residual stream
        let normed = Matrix(rows: t, columns: h)
        let q = Matrix(rows: t, columns: c.qDim)
        let attended = Matrix(rows: t, columns: c.qDim)
        let projected = Matrix(rows: t, columns: h)
        let gate = Matrix(rows: t, columns: c.intermediateSize)
        let up = Matrix(rows: t, columns: c.intermediateSize)
        let positions = (0..<t).map { Int32(start + $0) }
        // The window view of the ring layers: up to window − 1 earlier positions, then the chunk.
        let viewRows = (0..<c.layerCount).filter(cache.isRing).map { min(start, cache.layerRows[$0] - 1) + t }.max() ?? 0
        let windowKeys = Matrix(rows: viewRows, columns: c.kvDim), windowValues = Matrix(rows: viewRows, columns: c.kvDim)

        embed(tokens.map(Int32.init), into: x)
        for (l, block) in blocks.enumerated() {
            // keys/values row i holds position first + i.
            let keys: UnsafeMutablePointer<Float>, values: UnsafeMutablePointer<Float>, first: Int
            if cache.isRing(l) {
                first = start - min(start, cache.layerRows[l] - 1)
                keys = windowKeys.pointer
                values = windowValues.pointer
                cache.gather(layer: l, positions: first..<start, keys: keys, values: values)
            } else {
                first = 0
                keys = cache.keys[l].pointer
                values = cache.values[l].pointer
            }
            let newKeys = keys + (start - first) * c.kvDim, newValues = values + (start - first) * c.kvDim
            CPUOps.rmsNorm(x.pointer, weight: block.inputNorm, offset: offset, eps: c.rmsNormEps, rows: t, width: h, into: normed.pointer)
            DecoderBlock.forward(block.attentionInput, normed.pointer, rows: t, into: [(q.pointer, c.qDim), (newKeys, c.kvDim), (newValues, c.kvDim)])
            if let qNorm = block.qNorm, let kNorm = block.kNorm {
                // Per head: rows of head_dim.
                CPUOps.rmsNorm(q.pointer, weight: qNorm, offset: offset, eps: c.rmsNormEps, rows: t * c.headCount, width: c.headDim, into: q.pointer)
                CPUOps.rmsNorm(newKeys, weight: kNorm, offset: offset, eps: c.rmsNormEps, rows: t * c.kvHeadCount, width: c.headDim, into: newKeys)
            }
            let table = ropeTable(layer: l)
            positions.withUnsafeBufferPointer { p in
                CPUOps.applyRope(q.pointer, positions: p.baseAddress!, rows: t, heads: c.headCount, headDim: c.headDim, table: table, long: longRope)
                CPUOps.applyRope(newKeys, positions: p.baseAddress!, rows: t, heads: c.kvHeadCount, headDim: c.headDim, table: table, long: longRope)
            }
            let kind = c.layerAttention[l]
            CPUOps.attention(q: q.pointer, keys: keys, values: values, rows: t, heads: c.headCount, kvHeads: c.kvHeadCount,
                             headDim: c.headDim, scale: c.attentionScale, softcap: c.attentionSoftcap,
                             visible: { let r = kind.visible(position: start + $0); return (r.lowerBound - first)..<(r.upperBound - first) },
                             into: attended.pointer)
            if cache.isRing(l) {
                let kept = max(start, start + t - cache.layerRows[l])..<(start + t)
                cache.store(layer: l, positions: kept, keys: keys + (kept.lowerBound - first) * c.kvDim,
                            values: values + (kept.lowerBound - first) * c.kvDim)
            }
            block.o.forward(attended.pointer, rows: t, into: projected.pointer)
            if let norm = block.attentionOutputNorm {
                CPUOps.rmsNorm(projected.pointer, weight: norm, offset: offset, eps: c.rmsNormEps, rows: t, width: h, into: projected.pointer)
            }
            for i in 0..<(t * h) { x.pointer[i] += projected.pointer[i] }

            CPUOps.rmsNorm(x.pointer, weight: block.mlpInputNorm, offset: offset, eps: c.rmsNormEps, rows: t, width: h, into: normed.pointer)
            DecoderBlock.forward(block.mlpInput, normed.pointer, rows: t, into: [(gate.pointer, c.intermediateSize), (up.pointer, c.intermediateSize)])
            CPUOps.gatedActivation(c.mlpActivation, gate: gate.pointer, up: up.pointer, count: t * c.intermediateSize, into: gate.pointer)
            block.down.forward(gate.pointer, rows: t, into: projected.pointer)
            if let norm = block.mlpOutputNorm {
                CPUOps.rmsNorm(projected.pointer, weight: norm, offset: offset, eps: c.rmsNormEps, rows: t, width: h, into: projected.pointer)
            }
            for i in 0..<(t * h) { x.pointer[i] += projected.pointer[i] }
        }
        cache.advance(with: tokens)

        let firstRow = lastOnly ? t - 1 : 0
        let rows = t - firstRow
        CPUOps.rmsNorm(x.pointer + firstRow * h, weight: finalNorm, offset: offset, eps: c.rmsNormEps, rows: rows, width: h, into: normed.pointer)
        var logits = [Float](repeating: 0, count: rows * c.vocabularySize)
        logits.withUnsafeMutableBufferPointer {
            CPUMatmul.gemmNT(normed.pointer, head.pointer, $0.baseAddress!, m: rows, n: c.vocabularySize, k: h)
            if let cap = c.finalLogitSoftcap { CPUOps.softcap($0.baseAddress!, count: $0.count, cap: cap) }
        }
        return logits
    }

    /// x[i] = embedding[ids[i]] · the family's embedding scale (√hidden for Gemma, in fp32 as the CPU computes).
    func embed(_ ids: [Int32], into x: Matrix) {
        let h = config.hiddenSize
        let scale = config.embeddingScale(dtype: .f32)
        for (i, id) in ids.enumerated() {
            let row = x.pointer + i * h
            row.update(from: embedding.pointer + Int(id) * h, count: h)
            if config.scalesEmbedding { for j in 0..<h { row[j] *= scale } }
        }
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
