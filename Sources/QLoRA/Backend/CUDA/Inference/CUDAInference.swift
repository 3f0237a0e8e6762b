#if canImport(Glibc)
import Glibc
#endif

// Generation on the GPU with a KV cache: the CPU model's forward (Model/DecoderModel.swift `forward(tokens:cache:lastOnly:)`)
// with the base linear weights in NF4 + double quantization (bitsandbytes' layout), an unmerged LoRA adapter,
// bf16 activations and a bf16 KV cache, with every variation of the block that DecoderConfig describes:
// (1 + w) norms, q/k norms before RoPE, Gemma's sandwich norms, GeGLU, the embedding times √hidden (rounded to the
// compute dtype, as transformers' normalizer), query_pre_attn_scalar, attention and final-logit soft-capping, sliding
// windows per layer (a sliding layer's cache is a ring of min(window, capacity) rows, position p at row p mod rows; see
// the ring below), per-layer-type RoPE, partial rotary, longrope (short or
// long factors as the CPU picks them; the cache is recomputed with the long factors when a sequence first passes
// original_max_position_embeddings, as transformers and the CPU do), and Phi-3's fused qkv_proj / gate_up_proj.
//
// Prefill (several tokens): each NF4 weight is dequantized into a bf16 scratch matrix and multiplied with cuBLASLt
// (fp32 accumulation); LoRA as two more GEMMs; the outputs of a group go side by side into one fused row per token
// (q | k | v, gate | up) as in decode; q/k norm, RoPE and the cache append by rope_append_rows; attention by the
// flash kernel (attention.cu) when the cache was empty and the layer has no variation it lacks (soft-capping, a
// window shorter than the prompt), else by attention_rows (decode_batched.cu). A ring layer's prefill rotates without
// appending, attends with the chunk's own keys read from its rows (writing them first would overwrite ring rows the
// chunk's earlier queries still see), then appends the chunk's last `window` keys (kv_append_rows). A decode step
// appends first: its one key lands on the row of position p − window, which its query no longer sees.
// Decode (one token): per layer 10 kernels (12 with sandwich norms), the projections by nf4_gemv (or nf4_gemv_mma,
// where a shape and the card allow it; `gemvKernel` picks), which reads the 4-bit weights directly (q|k|v in one
// launch, gate|up in one, the residual added by o and down unless a sandwich norm comes between), the LoRA A
// projections of a group stacked into one matrix: lora_a_rows makes a group's input (RMSNorm, the gated activation)
// and xa before its GEMV.
// The whole step is recorded once
// as a CUDA graph and replayed; the position and token live in device memory, and so do the RoPE frequencies (a
// switch to longrope's long factors rewrites them in place).
// The output head stays bf16 (as bitsandbytes leaves lm_head), read by bf16_gemv into fp32 logits.
// Linear biases (Qwen2's q, k, v) are kept in bf16: prefill writes them into the output before the GEMM adds onto
// it (training.cu's add_row_vector); decode passes them as the GEMV's residual term when the output has no
// residual of its own (q, k, v, gate, up), else adds them into the residual stream right before the GEMV.

/// A group of projections that read the same input (q|k|v, o, gate|up, down), with their LoRA A rows stacked.
struct ProjectionGroup {
    var matrices: [CUDANF4Weight]
    /// Stacked LoRA A of the matrices that have one, [Σ r, in] bf16; nil when none has an adapter.
    var loraA: DeviceBuffer<UInt16>?
    /// Per matrix: (row offset into loraA, rank, B [out, r] bf16, scale), or nil.
    var lora: [(offset: Int, rank: Int, b: DeviceBuffer<UInt16>, scale: Float)?]
    /// Per matrix: its bias [rows] in bf16, or nil (empty: no matrix has one).
    var biases: [DeviceBuffer<UInt16>?] = []
    /// The decode tasks (device copy) and the grid size, made once the output addresses are known.
    var tasks: DeviceBuffer<UInt8>?
    var blocks = 0
    /// The same for nf4_gemv_splitk.
    var splitKTasks: DeviceBuffer<UInt8>?
    var splitKBlocks = 0
    var splits = 1

    var totalRank: Int { lora.reduce(0) { $0 + ($1?.rank ?? 0) } }
    func bias(_ m: Int) -> DeviceBuffer<UInt16>? { m < biases.count ? biases[m] : nil }
    var columns: Int { matrices[0].columns }
}

struct DeviceLayer {
    var inputNorm: DeviceBuffer<UInt16>
    /// The MLP's input norm (Llama's post_attention_layernorm, Gemma's pre_feedforward_layernorm).
    var postNorm: DeviceBuffer<UInt16>
    /// Gemma's norms on the attention output and on the MLP output (nil elsewhere).
    var attentionOutputNorm: DeviceBuffer<UInt16>? = nil
    var mlpOutputNorm: DeviceBuffer<UInt16>? = nil
    /// Per-head norms of q and k before RoPE, [head_dim] (Qwen3, Gemma 3; nil elsewhere).
    var qNorm: DeviceBuffer<UInt16>? = nil
    var kNorm: DeviceBuffer<UInt16>? = nil
    var qkv: ProjectionGroup
    var o: ProjectionGroup
    var gateUp: ProjectionGroup
    var down: ProjectionGroup
    var keys: DeviceBuffer<UInt16>    // [cache rows, kvDim]: capacity, or min(window, capacity) on a sliding layer
    var values: DeviceBuffer<UInt16>
}

/// One RoPE of the model on the device (the full-attention layers', and Gemma 3's sliding layers' when it differs):
/// its inverse frequencies, rewritten in place when longrope switches factors, and the cos/sin scale.
final class DeviceRope {
    let parameters: RopeParameters
    let frequencies: DeviceBuffer<Float>
    /// longrope's attention factor, 1 otherwise (as RopeTable).
    let scale: Float

    init(config c: DecoderConfig, parameters: RopeParameters, allocator: DeviceAllocator) throws {
        self.parameters = parameters
        frequencies = try allocator.buffer(copying: c.ropeInverseFrequencies(parameters).map { Float($0) })
        scale = Float(parameters.scaling.kind == .longrope ? parameters.scaling.attentionFactor : 1)
    }

    /// Uploads the short or long factors' frequencies (longrope only).
    func useLongFactors(_ long: Bool, config c: DecoderConfig) throws {
        guard parameters.scaling.kind == .longrope else { return }
        try frequencies.upload(c.ropeInverseFrequencies(parameters, long: long).map { Float($0) })
    }
}

/// A decoder model held on the GPU for generation, with its own KV cache.
public final class CUDAInference {
    public let context: CUDAContext
    public let config: DecoderConfig
    /// Positions the KV cache holds.
    public let capacity: Int
    /// Tokens in the KV cache.
    public private(set) var length = 0
    /// The tokens the cache holds (to recompute it when longrope switches to its long factors).
    private(set) var history: [Int] = []
    /// Whether the RoPE frequencies on the device are longrope's long factors.
    private(set) var usesLongRopeFactors = false
    /// Replay the decode step as a CUDA graph (on by default; off to time plain launches).
    public var useGraph = true

    /// The fused NF4 GEMV of the decode step.
    public enum GEMVKernel: String, CaseIterable {
        /// nf4_gemv: 4 rows per warp, x copied to shared memory.
        case rows
        /// nf4_gemv_splitk: columns split over the warps of a block, x through L1.
        case splitK = "splitk"
        /// nf4_gemv_mma: two codes per table load, the dot products on the tensor cores (rows where a group's shape or
        /// the card does not allow it: see `CUDAContext.nf4GemvMMASupported`).
        case mma
    }
    /// Which NF4 GEMV decode uses; changing it re-records the graph. `rows` until `mma` measures faster: on the H100
    /// (session 6) mma was even on q|k|v, o and down and 15% slower on gate|up (docs/PERFORMANCE.md).
    public var gemvKernel: GEMVKernel = .rows {
        didSet { if gemvKernel != oldValue { graph = nil } }
    }

    var layers: [DeviceLayer]
    let embedding: DeviceBuffer<UInt16>   // [vocab, H]
    let finalNorm: DeviceBuffer<UInt16>
    let head: DeviceBuffer<UInt16>        // [vocab, H]; the embedding itself when tied
    /// The RoPEs (full layers first) and which one each layer rotates by.
    let ropes: [DeviceRope]
    let ropeOfLayer: [Int]
    /// Each layer's attention window (0: every earlier position).
    let windows: [Int]
    /// Each layer's KV-cache rows: `capacity`, or min(window, capacity) on a sliding layer (a ring).
    public let layerRows: [Int]
    /// The embedding multiplier in the compute dtype (√hidden for Gemma, else 1).
    let embeddingScale: Float

    // Decode buffers (fixed addresses, so a graph can replay them).
    let stepState: DeviceBuffer<Int32>    // [position, token]
    let x: DeviceBuffer<UInt16>
    let normed: DeviceBuffer<UInt16>
    let qkvRow: DeviceBuffer<UInt16>
    let attended: DeviceBuffer<UInt16>
    let gateUpRow: DeviceBuffer<UInt16>
    let hidden: DeviceBuffer<UInt16>
    /// The o or down output before Gemma's sandwich norm adds it to x.
    let projected: DeviceBuffer<UInt16>
    let xa: DeviceBuffer<Float>
    let logits: DeviceBuffer<Float>
    private var graph: CUDAGraph?

    // MARK: Building

    /// Uploads `model` with each linear layer's base weight as NF4 + double quant: `quantized[name]` when given
    /// (e.g. from `quantizeBase`), else quantized here. LoRA adapters set on the model's layers come along unmerged.
    /// `sharing[name]`, when given, is that layer's NF4 weight already on the GPU (the trainer's during training),
    /// used as it is: one copy of the base on the card.
    public convenience init(context: CUDAContext, model: DecoderModel, capacity: Int,
                            quantized: [String: QuantizedWeight] = [:], sharing frozen: [String: CUDANF4Weight] = [:]) throws {
        let c = model.config
        // Refused before anything is uploaded.
        try c.checkCUDASupport(what: "a KV cache of \(capacity) positions")
        let A = context.allocator
        func bf16(_ values: [Float]) throws -> DeviceBuffer<UInt16> { try A.buffer(copying: values.map(context.computeDType.encode)) }
        func optionalBF16(_ values: [Float]?) throws -> DeviceBuffer<UInt16>? { try values.map { try bf16($0) } }
        func bf16(_ m: Matrix) throws -> DeviceBuffer<UInt16> {
            let b = try A.buffer(UInt16.self, count: m.count)
            try b.upload((0..<m.count).map { context.computeDType.encode(m.pointer[$0]) })
            return b
        }
        let code = try A.buffer(copying: DoubleQuantizedAbsmax.signedDynamicMap)
        func group(_ linears: [Linear]) throws -> ProjectionGroup {
            var matrices: [CUDANF4Weight] = []
            var loras: [(offset: Int, rank: Int, b: DeviceBuffer<UInt16>, scale: Float)?] = []
            var biases: [DeviceBuffer<UInt16>?] = []
            var stacked: [Float] = []
            var offset = 0
            for l in linears {
                if let bias = l.bias {
                    guard bias.count == l.outFeatures else {
                        throw UsageError("the bias of \(l.name) has \(bias.count) values for \(l.outFeatures) outputs")
                    }
                    biases.append(try bf16(bias))
                } else {
                    biases.append(nil)
                }
                if let shared = frozen[l.name] {
                    guard shared.rows == l.outFeatures, shared.columns == l.inFeatures else {
                        throw UsageError("the GPU's NF4 weight of \(l.name) is \(shared.rows) × \(shared.columns), the model's layer "
                                         + "\(l.outFeatures) × \(l.inFeatures)")
                    }
                    matrices.append(shared)
                } else {
                    let q = try quantized[l.name] ?? CUDAInference.quantize(l)
                    matrices.append(try CUDANF4Weight(q, allocator: A, signedDynamicMap: code))
                }
                if let lora = l.lora {
                    stacked += lora.a.values
                    loras.append((offset, lora.rank, try bf16(lora.b), lora.scale))
                    offset += lora.rank
                } else {
                    loras.append(nil)
                }
            }
            return ProjectionGroup(matrices: matrices, loraA: stacked.isEmpty ? nil : try bf16(stacked), lora: loras,
                                   biases: biases.contains { $0 != nil } ? biases : [])
        }
        var layers: [DeviceLayer] = []
        for (l, block) in model.blocks.enumerated() {
            let cacheRows = c.layerAttention[l].cacheRows(capacity: capacity)
            layers.append(DeviceLayer(
                inputNorm: try bf16(block.inputNorm), postNorm: try bf16(block.mlpInputNorm),
                attentionOutputNorm: try optionalBF16(block.attentionOutputNorm), mlpOutputNorm: try optionalBF16(block.mlpOutputNorm),
                qNorm: try optionalBF16(block.qNorm), kNorm: try optionalBF16(block.kNorm),
                qkv: try group(block.attentionInput), o: try group([block.o]),
                gateUp: try group(block.mlpInput), down: try group([block.down]),
                keys: try A.buffer(UInt16.self, count: cacheRows * c.kvDim), values: try A.buffer(UInt16.self, count: cacheRows * c.kvDim)))
        }
        let embedding = try bf16(model.embedding)
        let head = model.head === model.embedding ? embedding : try bf16(model.head)
        try self.init(context: context, config: c, capacity: capacity, layers: layers, embedding: embedding,
                      finalNorm: try bf16(model.finalNorm), head: head)
    }

    /// A model of `config`'s shape with random NF4 weights made on the GPU and a random LoRA adapter of rank
    /// `loraRank` (0: none) on all seven projections, for benchmarks.
    public convenience init(context: CUDAContext, randomConfig c: DecoderConfig, loraRank: Int, capacity: Int, seed: UInt64 = 1) throws {
        try c.checkCUDASupport(what: "a KV cache of \(capacity) positions")
        let A = context.allocator
        var s = seed
        func next() -> UInt64 { s &+= 0x9E37_79B9; return s }
        func randomBF16(_ count: Int, _ lo: Float, _ hi: Float) throws -> DeviceBuffer<UInt16> {
            let b = try A.buffer(UInt16.self, count: count)
            try context.randomBF16(b.pointer, count: count, lo: lo, hi: hi, seed: next())
            return b
        }
        let code = try A.buffer(copying: DoubleQuantizedAbsmax.signedDynamicMap)
        func group(_ shapes: [(Int, Int)]) throws -> ProjectionGroup {
            let matrices = try shapes.map {
                try CUDANF4Weight(randomRows: $0.0, columns: $0.1, context: context, code: code, packedSeed: next(), absmaxSeed: next())
            }
            guard loraRank > 0 else { return ProjectionGroup(matrices: matrices, loraA: nil, lora: shapes.map { _ in nil }) }
            let a = try randomBF16(loraRank * shapes.count * shapes[0].1, -0.01, 0.01)
            let lora = try shapes.enumerated().map { (i, shape) in
                (offset: i * loraRank, rank: loraRank, b: try randomBF16(shape.0 * loraRank, -0.01, 0.01), scale: Float(2))
            }
            return ProjectionGroup(matrices: matrices, loraA: a, lora: lora)
        }
        let h = c.hiddenSize, i = c.intermediateSize
        var layers: [DeviceLayer] = []
        // Norm weights near 1 (or near 0 for Gemma's x·(1 + w)).
        let normCenter: Float = c.normWeightOffset != 0 ? 0 : 1
        func norm(_ count: Int) throws -> DeviceBuffer<UInt16> { try randomBF16(count, normCenter - 0.1, normCenter + 0.1) }
        for l in 0..<c.layerCount {
            let cacheRows = c.layerAttention[l].cacheRows(capacity: capacity)
            layers.append(DeviceLayer(
                inputNorm: try norm(h), postNorm: try norm(h),
                attentionOutputNorm: c.sandwichNorms ? try norm(h) : nil, mlpOutputNorm: c.sandwichNorms ? try norm(h) : nil,
                qNorm: c.qkNorm ? try norm(c.headDim) : nil, kNorm: c.qkNorm ? try norm(c.headDim) : nil,
                qkv: try group(c.fusedProjections ? [(c.qDim + 2 * c.kvDim, h)] : [(c.qDim, h), (c.kvDim, h), (c.kvDim, h)]),
                o: try group([(h, c.qDim)]),
                gateUp: try group(c.fusedProjections ? [(2 * i, h)] : [(i, h), (i, h)]), down: try group([(h, i)]),
                keys: try A.buffer(UInt16.self, count: cacheRows * c.kvDim), values: try A.buffer(UInt16.self, count: cacheRows * c.kvDim)))
        }
        let embedding = try randomBF16(c.vocabularySize * h, -0.05, 0.05)
        let head = c.tieWordEmbeddings ? embedding : try randomBF16(c.vocabularySize * h, -0.05, 0.05)
        try self.init(context: context, config: c, capacity: capacity, layers: layers, embedding: embedding,
                      finalNorm: try norm(h), head: head)
    }

    private init(context: CUDAContext, config c: DecoderConfig, capacity: Int, layers: [DeviceLayer], embedding: DeviceBuffer<UInt16>,
                 finalNorm: DeviceBuffer<UInt16>, head: DeviceBuffer<UInt16>) throws {
        guard c.hiddenSize % 32 == 0, c.qDim % 32 == 0, c.intermediateSize % 32 == 0, CUDAContext.decodeHeadDims.contains(c.headDim) else {
            throw UsageError("the GPU decode path needs hidden, q and intermediate sizes that are multiples of 32 and a head dimension of 32, 64, 96, 128 or 256 (hidden \(c.hiddenSize), intermediate \(c.intermediateSize), head dim \(c.headDim))")
        }
        guard capacity > 0, capacity <= c.maxPositionEmbeddings else {
            throw UsageError("a KV cache of \(capacity) positions does not fit the model's \(c.maxPositionEmbeddings)")
        }
        try c.checkCUDASupport(what: "a KV cache of \(capacity) positions")
        guard layers.allSatisfy({ ($0.attentionOutputNorm != nil) == c.sandwichNorms && ($0.mlpOutputNorm != nil) == c.sandwichNorms
                                   && ($0.qNorm != nil) == c.qkNorm && ($0.kNorm != nil) == c.qkNorm }) else {
            throw UsageError("the model's layers do not hold the norms its config describes (sandwich norms \(c.sandwichNorms), q/k norms \(c.qkNorm))")
        }
        self.context = context
        self.config = c
        self.capacity = capacity
        self.layers = layers
        self.embedding = embedding
        self.finalNorm = finalNorm
        self.head = head
        let A = context.allocator
        var ropes = [try DeviceRope(config: c, parameters: RopeParameters(theta: c.ropeTheta, scaling: c.ropeScaling), allocator: A)]
        if let sliding = c.slidingRope { ropes.append(try DeviceRope(config: c, parameters: sliding, allocator: A)) }
        self.ropes = ropes
        ropeOfLayer = (0..<c.layerCount).map { l in
            if c.slidingRope != nil, case .sliding = c.layerAttention[l] { return 1 }
            return 0
        }
        windows = c.layerAttention.map { kind in
            if case .sliding(let window) = kind { return window }
            return 0
        }
        layerRows = c.layerAttention.map { $0.cacheRows(capacity: capacity) }
        guard zip(layers, layerRows).allSatisfy({ $0.keys.count == $1 * c.kvDim && $0.values.count == $1 * c.kvDim }) else {
            throw UsageError("the KV caches do not hold each layer's \(layerRows) rows of \(c.kvDim) values")
        }
        let dtype = context.computeDType
        embeddingScale = c.scalesEmbedding ? dtype.decode(dtype.encode(Float(Double(c.hiddenSize).squareRoot()))) : 1
        stepState = try A.buffer(copying: [Int32(0), Int32(0)])
        x = try A.buffer(UInt16.self, count: c.hiddenSize)
        normed = try A.buffer(UInt16.self, count: max(c.hiddenSize, 8))
        qkvRow = try A.buffer(UInt16.self, count: c.qDim + 2 * c.kvDim)
        attended = try A.buffer(UInt16.self, count: c.qDim)
        gateUpRow = try A.buffer(UInt16.self, count: 2 * c.intermediateSize)
        hidden = try A.buffer(UInt16.self, count: c.intermediateSize)
        projected = try A.buffer(UInt16.self, count: c.hiddenSize)
        let maxRank = layers.flatMap { [$0.qkv, $0.o, $0.gateUp, $0.down] }.map(\.totalRank).max() ?? 0
        xa = try A.buffer(Float.self, count: max(maxRank, 1))
        logits = try A.buffer(Float.self, count: c.vocabularySize)
        // Decode tasks: outputs at fixed addresses.
        let q = c.qDim, kv = c.kvDim, inter = c.intermediateSize
        for l in self.layers.indices {
            try makeTasks(&self.layers[l].qkv, outputs: [qkvRow.pointer, qkvRow.address(at: q), qkvRow.address(at: q + kv)], residual: 0)
            // With sandwich norms o and down write `projected`, which the norm then adds to x.
            let (out, residual) = c.sandwichNorms ? (projected.pointer, CUdeviceptr(0)) : (x.pointer, x.pointer)
            try makeTasks(&self.layers[l].o, outputs: [out], residual: residual)
            try makeTasks(&self.layers[l].gateUp, outputs: [gateUpRow.pointer, gateUpRow.address(at: inter)], residual: 0)
            try makeTasks(&self.layers[l].down, outputs: [out], residual: residual)
        }
        // Compile the kernels now (nothing may compile while a graph is recorded).
        for source in [KernelSources.decode, KernelSources.decodeBatched, KernelSources.nf4, KernelSources.attention,
                       KernelSources.training] {
            _ = try context.compiler.module(source)
        }
    }

    private func makeTasks(_ g: inout ProjectionGroup, outputs: [CUdeviceptr], residual: CUdeviceptr) throws {
        var tasks: [NF4GemvTask] = []
        for (m, (matrix, out)) in zip(g.matrices, outputs).enumerated() {
            var t = NF4GemvTask(packed: matrix.packed.pointer, absmaxCodes: matrix.absmaxCodes.pointer,
                                nestedAbsmax: matrix.nestedAbsmax.pointer, code: matrix.code.pointer, offset: matrix.offset,
                                rows: matrix.rows, out: out)
            // A bias on an output without a residual is the GEMV's residual term; else decodeLaunches adds it first.
            t.residual = residual != 0 ? residual : g.bias(m)?.pointer ?? 0
            if let lora = g.lora[m] {
                guard lora.rank <= 32 else { throw UsageError("LoRA rank \(lora.rank) above 32 is not supported by the GPU decode path yet") }
                t.loraB = lora.b.pointer
                t.xa = xa.address(at: lora.offset)
                t.loraScale = lora.scale
                t.rank = lora.rank
            }
            tasks.append(t)
        }
        let (bytes, blocks) = NF4GemvTask.encode(tasks)
        g.tasks = try context.allocator.buffer(copying: bytes)
        g.blocks = blocks
        g.splits = NF4GemvTask.splits(cols: g.columns)
        let (splitBytes, splitBlocks) = NF4GemvTask.encode(tasks, rowsPerBlock: NF4GemvTask.splitKRowsPerBlock(g.splits))
        g.splitKTasks = try context.allocator.buffer(copying: splitBytes)
        g.splitKBlocks = splitBlocks
    }

    /// A linear layer's weight in NF4 (blocksize 64, double quant): the layer's own 4-bit weight when it
    /// already is one, else quantized as bitsandbytes would.
    static func quantize(_ l: Linear) throws -> QuantizedWeight {
        if case .quantized(let q) = l.weight.storage, q.quantType == .nf4, q.blocksize == 64, case .doubleQuantized = q.scales {
            return q
        }
        return try QuantizedWeight.quantize(l.weight.values(), shape: [l.outFeatures, l.inFeatures], type: .nf4,
                                            blocksize: 64, doubleQuant: true, dtype: .f32)
    }

    /// Quantizes every linear layer's base weight of `model` to NF4 + double quant. With `replacingCPUWeights`
    /// the CPU model's layers then hold the same 4-bit weights, so CPU and GPU compute with the same values.
    public static func quantizeBase(_ model: DecoderModel, replacingCPUWeights: Bool) throws -> [String: QuantizedWeight] {
        var result: [String: QuantizedWeight] = [:]
        for l in model.linearLayers {
            let q = try quantize(l)
            if replacingCPUWeights { l.weight = try FrozenWeight(quantized: q) }
            result[l.name] = q
        }
        return result
    }

    // MARK: Sizes

    /// Bytes of the KV cache (keys and values of every layer): `DecoderConfig.kvCacheBytes(capacity:)`.
    public var kvCacheBytes: Int { layers.reduce(0) { $0 + $1.keys.byteCount + $1.values.byteCount } }

    /// Bytes of 4-bit weights (packed codes and their scales) read per decoded token.
    public var nf4BytesPerToken: Int {
        layers.reduce(0) { $0 + [$1.qkv, $1.o, $1.gateUp, $1.down].reduce(0) { $0 + $1.matrices.reduce(0) { $0 + $1.bytesRead } } }
    }

    /// All weight bytes read per decoded token: the 4-bit weights, the LoRA matrices, the norms, the bf16 head and
    /// one embedding row.
    public var weightBytesPerToken: Int {
        var bytes = nf4BytesPerToken + head.byteCount + finalNorm.byteCount + config.hiddenSize * 2
        for l in layers {
            bytes += l.inputNorm.byteCount + l.postNorm.byteCount
            for norm in [l.attentionOutputNorm, l.mlpOutputNorm, l.qNorm, l.kNorm] { bytes += norm?.byteCount ?? 0 }
            for g in [l.qkv, l.o, l.gateUp, l.down] {
                bytes += g.loraA?.byteCount ?? 0
                bytes += g.lora.reduce(0) { $0 + ($1?.b.byteCount ?? 0) }
            }
        }
        return bytes
    }

    // MARK: Forward

    /// Empties the KV cache.
    public func reset() {
        length = 0
        history = []
    }

    /// Runs `tokens` after what the cache holds and returns their logits, [T, vocab] (the last row only when
    /// `lastOnly`), as `DecoderModel.forward(tokens:cache:lastOnly:)` does.
    public func forward(tokens: [Int], lastOnly: Bool = false) throws -> [Float] {
        let c = config
        guard !tokens.isEmpty else { return [] }
        guard length + tokens.count <= capacity else {
            throw UsageError("the sequence needs \(length + tokens.count) positions but the KV cache holds \(capacity)")
        }
        for id in tokens where id < 0 || id >= c.vocabularySize {
            throw UsageError("token id \(id) is outside the vocabulary (0..<\(c.vocabularySize))")
        }
        let long = c.usesLongRopeFactors(sequenceLength: length + tokens.count)
        if long != usesLongRopeFactors {
            if long && length > 0 {
                // The cached keys were rotated with the short factors: recompute the cache with the long ones, as
                // DecoderModel.forward (and transformers' Phi-3 generation) does.
                let all = history + tokens
                reset()
                let logits = try forward(tokens: all, lastOnly: lastOnly)
                return lastOnly ? logits : Array(logits.suffix(tokens.count * c.vocabularySize))
            }
            for rope in ropes { try rope.useLongFactors(long, config: c) }
            usesLongRopeFactors = long
        }
        history += tokens
        if tokens.count == 1 { return try decode(token: tokens[0]) }
        return try prefill(tokens: tokens, lastOnly: lastOnly)
    }

    /// One token through the fused decode kernels; returns its logits.
    func decode(token: Int) throws -> [Float] {
        let dev = context.device
        try stepState.upload([Int32(length), Int32(token)])
        if useGraph {
            if graph == nil {
                do {
                    graph = try CUDAGraph(device: dev, stream: dev.stream) { try decodeLaunches() }
                } catch {
                    useGraph = false
                    fputs("warning: CUDA graph capture failed (\(error)); decoding with plain launches\n", stderr)
                }
            }
        }
        if useGraph, let graph {
            try graph.launch(on: dev.stream)
        } else {
            try decodeLaunches()
        }
        length += 1
        return try logits.download()
    }

    /// The kernels of one decode step (position and token read from `stepState`). `mark` is called after each
    /// launch with its name (profiling).
    func decodeLaunches(mark: (String) throws -> Void = { _ in }) throws {
        let c = config, ctx = context
        let h = c.hiddenSize, offset = c.normWeightOffset
        /// The group's LoRA A rows with the op making its input (see lora_a_rows), writing that input to `inOut`.
        func loraA(_ g: ProjectionGroup, mode: Int, x: CUdeviceptr, x2: CUdeviceptr = 0, norm: CUdeviceptr = 0, inOut: CUdeviceptr) throws {
            try ctx.loraARows(a: g.loraA?.pointer ?? 0, x: x, x2: x2, normWeight: norm, inOut: inOut, xa: xa.pointer,
                              rows: g.loraA == nil ? 0 : g.totalRank, cols: g.columns, mode: mode, eps: c.rmsNormEps, normOffset: offset,
                              activation: c.mlpActivation)
            try mark(mode == 1 ? "rmsnorm + lora A" : mode == 2 ? "\(c.mlpActivation == .silu ? "swiglu" : "geglu") + lora A" : "lora A")
        }
        func gemv(_ g: ProjectionGroup, input: CUdeviceptr, _ name: String) throws {
            switch gemvKernel {
            case .mma where ctx.nf4GemvMMASupported(cols: g.columns, blocksize: g.matrices[0].blocksize):
                try ctx.nf4GemvMMA(tasks: g.tasks!.pointer, taskCount: g.matrices.count, blocks: g.blocks, x: input, cols: g.columns,
                                   blocksize: g.matrices[0].blocksize, nestedBlocksize: g.matrices[0].nestedBlocksize)
            case .rows, .mma:
                try ctx.nf4Gemv(tasks: g.tasks!.pointer, taskCount: g.matrices.count, blocks: g.blocks, x: input, cols: g.columns,
                                blocksize: g.matrices[0].blocksize, nestedBlocksize: g.matrices[0].nestedBlocksize)
            case .splitK:
                try ctx.nf4GemvSplitK(tasks: g.splitKTasks!.pointer, taskCount: g.matrices.count, blocks: g.splitKBlocks, x: input,
                                      cols: g.columns, blocksize: g.matrices[0].blocksize,
                                      nestedBlocksize: g.matrices[0].nestedBlocksize, splits: g.splits)
            }
            try mark(name)
        }
        /// x += the bias of a group whose output is the residual stream x (o, down), before its GEMV adds onto x.
        func residualBias(_ g: ProjectionGroup) throws {
            guard let bias = g.bias(0) else { return }
            try ctx.addRowVector(bias.pointer, to: x.pointer, rows: 1, columns: h, overwrite: false)
            try mark("bias")
        }
        /// Gemma's sandwich: x += norm(projected), after o or down wrote `projected`.
        func sandwich(_ norm: DeviceBuffer<UInt16>?) throws {
            guard let norm else { return }
            try ctx.rmsNormRows(x: projected.pointer, weight: norm.pointer, out: x.pointer, rows: 1, dim: h, eps: c.rmsNormEps,
                                offset: offset, add: true)
            try mark("rmsnorm + residual")
        }
        /// A group's projection with the op that makes its input (mode as lora_a_rows: 0 in = `input`, 1 RMSNorm(input)·norm,
        /// 2 act(input)·x2) and its LoRA A product: lora_a_rows (writing the input to `inOut` and xa) where there is an op or
        /// a LoRA A, then the GEMV. `bias`: the group's output is the residual stream x (o, down), whose bias is added to x
        /// first.
        func project(_ g: ProjectionGroup, mode: Int, input: CUdeviceptr, x2: CUdeviceptr = 0, norm: CUdeviceptr = 0, inOut: CUdeviceptr,
                     bias: Bool, _ name: String) throws {
            if bias { try residualBias(g) }
            if mode != 0 || g.loraA != nil { try loraA(g, mode: mode, x: input, x2: x2, norm: norm, inOut: mode == 0 ? 0 : inOut) }
            try gemv(g, input: mode == 0 ? input : inOut, name)
        }
        try ctx.embeddingRows(ids: stepState.address(at: 1), table: embedding.pointer, out: x.pointer, rows: 1, dim: h, scale: embeddingScale)
        try mark("embedding")
        let inter = c.intermediateSize
        for (l, layer) in layers.enumerated() {
            try project(layer.qkv, mode: 1, input: x.pointer, norm: layer.inputNorm.pointer, inOut: normed.pointer, bias: false, "nf4 gemv q|k|v")
            let rope = ropes[ropeOfLayer[l]]
            try ctx.ropeAppendRows(qkv: qkvRow.pointer, stride: c.qDim + 2 * c.kvDim, kcache: layer.keys.pointer, vcache: layer.values.pointer,
                                   slots: 0, positions: stepState.pointer, inverseFrequencies: rope.frequencies.pointer, rows: 1,
                                   capacity: layerRows[l], heads: c.headCount, kvHeads: c.kvHeadCount, headDim: c.headDim,
                                   rotaryDim: c.rotaryDim, ropeScale: rope.scale, qNorm: layer.qNorm?.pointer ?? 0,
                                   kNorm: layer.kNorm?.pointer ?? 0, normOffset: offset, eps: c.rmsNormEps)
            try mark(c.qkNorm ? "q/k norm + rope + cache append" : "rope + cache append")
            try ctx.attentionCached(q: qkvRow.pointer, qStride: c.qDim, kcache: layer.keys.pointer, vcache: layer.values.pointer,
                                    out: attended.pointer, startPointer: stepState.pointer, start: 0, tokens: 1, heads: c.headCount,
                                    kvHeads: c.kvHeadCount, headDim: c.headDim, maxKeys: capacity, scale: c.attentionScale,
                                    softcap: c.attentionSoftcap ?? 0, window: windows[l], ring: layerRows[l])
            try mark("attention")
            try project(layer.o, mode: 0, input: attended.pointer, inOut: 0, bias: true,
                        c.sandwichNorms ? "nf4 gemv o" : "nf4 gemv o (+ residual)")
            try sandwich(layer.attentionOutputNorm)
            try project(layer.gateUp, mode: 1, input: x.pointer, norm: layer.postNorm.pointer, inOut: normed.pointer, bias: false,
                        "nf4 gemv gate|up")
            try project(layer.down, mode: 2, input: gateUpRow.pointer, x2: gateUpRow.address(at: inter), inOut: hidden.pointer, bias: true,
                        c.sandwichNorms ? "nf4 gemv down" : "nf4 gemv down (+ residual)")
            try sandwich(layer.mlpOutputNorm)
        }
        try ctx.rmsNormRows(x: x.pointer, weight: finalNorm.pointer, out: normed.pointer, rows: 1, dim: h, eps: c.rmsNormEps, offset: offset)
        try mark("final rmsnorm")
        try ctx.bf16Gemv(weight: head.pointer, x: normed.pointer, out: logits.pointer, rows: c.vocabularySize, cols: h)
        try mark("head gemv (bf16)")
        if let cap = c.finalLogitSoftcap {
            try ctx.softcapLogits(logits.pointer, count: c.vocabularySize, cap: cap)
            try mark("logit soft-capping")
        }
    }

    /// GPU milliseconds per decoded token by kernel kind, over `tokens` steps launched one by one with an event after
    /// each kernel (the steps continue the current sequence; the totals include the gaps between launches).
    public func profileDecode(tokens: Int, token: Int = 1) throws -> [(name: String, milliseconds: Double, launches: Int)] {
        let dev = context.device
        var totals: [String: (Double, Int)] = [:]
        var order: [String] = []
        for _ in 0..<tokens {
            guard length < capacity else { break }
            try stepState.upload([Int32(length), Int32(token)])
            var events: [(String, CUDAEvent)] = []
            let first = try CUDAEvent(device: dev)
            try first.record(on: dev.stream)
            try decodeLaunches { name in
                let e = try CUDAEvent(device: dev)
                try e.record(on: dev.stream)
                events.append((name, e))
            }
            try dev.stream.synchronize()
            var previous = first
            for (name, e) in events {
                let ms = try e.milliseconds(since: previous)
                if totals[name] == nil { order.append(name) }
                let t = totals[name] ?? (0, 0)
                totals[name] = (t.0 + ms, t.1 + 1)
                previous = e
            }
            length += 1
        }
        let n = Double(max(tokens, 1))
        return order.map { ($0, totals[$0]!.0 / n, Int(Double(totals[$0]!.1) / n)) }
    }

    /// Several tokens with GEMMs.
    func prefill(tokens: [Int], lastOnly: Bool) throws -> [Float] {
        let c = config, ctx = context, dev = context.device, A = context.allocator
        let t = tokens.count, start = length, h = c.hiddenSize, offset = c.normWeightOffset, eps = c.rmsNormEps
        let qkvDim = c.qDim + 2 * c.kvDim, inter = c.intermediateSize
        let blas = try ctx.blas()
        let ids = try A.buffer(copying: tokens.map { Int32($0) })
        let positions = try A.buffer(copying: (0..<t).map { Int32(start + $0) })
        let xs = try A.buffer(UInt16.self, count: t * h)
        let normedRows = try A.buffer(UInt16.self, count: t * h)
        let qkvRows = try A.buffer(UInt16.self, count: t * qkvDim)
        let att = try A.buffer(UInt16.self, count: t * c.qDim)
        let gateUp = try A.buffer(UInt16.self, count: t * 2 * inter)
        let hiddenRows = try A.buffer(UInt16.self, count: t * inter)
        let projectedRows = c.sandwichNorms ? try A.buffer(UInt16.self, count: t * h) : xs
        let matrices = layers.flatMap { [$0.qkv, $0.o, $0.gateUp, $0.down] }.flatMap(\.matrices)
        let maxWeight = matrices.map { $0.rows * $0.columns }.max() ?? 1
        let w = try A.buffer(UInt16.self, count: maxWeight)
        // One matrix's output of a separate-projection group, before it is copied into its columns of the fused row.
        let part = try A.buffer(UInt16.self, count: t * max(c.qDim, inter))
        let xaRows = try A.buffer(UInt16.self, count: t * 64)
        let lse = try A.buffer(Float.self, count: t * c.headCount)
        // The chunk is one run (decode_batched.cu's header): every row's run starts at row 0 and ends at row t.
        let rings = layerRows.contains { $0 < capacity }
        let runStart = rings ? try A.buffer(copying: [Int32](repeating: 0, count: t)) : nil
        let runEnd = rings ? try A.buffer(copying: [Int32](repeating: Int32(t), count: t)) : nil

        /// out (= or += when accumulate) input · Wᵀ + bias + s (input · Aᵀ) · Bᵀ for matrix m of group g.
        func linear(_ g: ProjectionGroup, _ m: Int, input: CUdeviceptr, out: CUdeviceptr, accumulate: Bool) throws {
            let matrix = g.matrices[m]
            try ctx.dequantize(matrix, into: w)
            if let bias = g.bias(m) {
                try ctx.addRowVector(bias.pointer, to: out, rows: t, columns: matrix.rows, overwrite: !accumulate)
            }
            try blas.gemm(m: t, n: matrix.rows, k: matrix.columns, a: input, b: w.pointer, transB: true, c: out,
                          beta: accumulate || g.bias(m) != nil ? 1 : 0)
            if let lora = g.lora[m], let a = g.loraA {
                let aRows = a.address(at: lora.offset * matrix.columns)
                let xaBuffer = lora.rank <= 64 ? xaRows : try A.buffer(UInt16.self, count: t * lora.rank)
                try blas.gemm(m: t, n: lora.rank, k: matrix.columns, a: input, b: aRows, transB: true, c: xaBuffer.pointer)
                try blas.gemm(m: t, n: matrix.rows, k: lora.rank, a: xaBuffer.pointer, b: lora.b.pointer, transB: true, c: out,
                              alpha: lora.scale, beta: 1)
            }
        }
        /// The group's outputs side by side in one fused row per token ([t, Σ rows]): a fused matrix writes it
        /// directly; separate ones go through `part` into their columns.
        func group(_ g: ProjectionGroup, input: CUdeviceptr, into out: DeviceBuffer<UInt16>) throws {
            if g.matrices.count == 1 { return try linear(g, 0, input: input, out: out.pointer, accumulate: false) }
            let width = g.matrices.reduce(0) { $0 + $1.rows }
            var column = 0
            for m in g.matrices.indices {
                try linear(g, m, input: input, out: part.pointer, accumulate: false)
                try ctx.copyBlock(part.pointer, to: out.pointer, rows: t, cols: g.matrices[m].rows, dstStride: width, dstColumn: column)
                column += g.matrices[m].rows
            }
        }
        /// x += the output projection of `input` (o or down), through Gemma's sandwich norm when it has one.
        func residual(_ g: ProjectionGroup, input: CUdeviceptr, norm: DeviceBuffer<UInt16>?) throws {
            guard let norm else { return try linear(g, 0, input: input, out: xs.pointer, accumulate: true) }
            try linear(g, 0, input: input, out: projectedRows.pointer, accumulate: false)
            try ctx.rmsNormRows(x: projectedRows.pointer, weight: norm.pointer, out: xs.pointer, rows: t, dim: h, eps: eps, offset: offset,
                                add: true)
        }

        try ctx.embeddingRows(ids: ids.pointer, table: embedding.pointer, out: xs.pointer, rows: t, dim: h, scale: embeddingScale)
        for (l, layer) in layers.enumerated() {
            try ctx.rmsNormRows(x: xs.pointer, weight: layer.inputNorm.pointer, out: normedRows.pointer, rows: t, dim: h, eps: eps, offset: offset)
            try group(layer.qkv, input: normedRows.pointer, into: qkvRows)
            let rope = ropes[ropeOfLayer[l]]
            let window = windows[l], cacheRows = layerRows[l]
            // The flash kernel: an empty cache, no soft-capping, no window shorter than the prompt (so no ring wraps).
            let flash = start == 0 && (c.headDim == 64 || c.headDim == 128) && c.attentionSoftcap == nil && (window == 0 || t <= window)
            // A ring layer outside the flash path appends after its attention (see the header).
            let appendAfter = cacheRows < capacity && !flash
            try ctx.ropeAppendRows(qkv: qkvRows.pointer, stride: qkvDim, kcache: appendAfter ? 0 : layer.keys.pointer,
                                   vcache: appendAfter ? 0 : layer.values.pointer, slots: 0,
                                   positions: positions.pointer, inverseFrequencies: rope.frequencies.pointer, rows: t, capacity: cacheRows,
                                   heads: c.headCount, kvHeads: c.kvHeadCount, headDim: c.headDim, rotaryDim: c.rotaryDim,
                                   ropeScale: rope.scale, qNorm: layer.qNorm?.pointer ?? 0, kNorm: layer.kNorm?.pointer ?? 0,
                                   normOffset: offset, eps: eps)
            if flash {
                // q out of the fused rows into `part` (free between projection groups).
                try ctx.copyBlock(qkvRows.pointer, to: part.pointer, rows: t, cols: c.qDim, dstStride: c.qDim, dstColumn: 0, srcStride: qkvDim)
                try dev.launch(ctx.compiler.function(KernelSources.attention, "attention_forward_d\(c.headDim)"),
                               grid: ((t + 63) / 64, c.headCount, 1), block: (256, 1, 1),
                               [part.arg, .pointer(layer.keys.pointer), .pointer(layer.values.pointer), att.arg, lse.arg, .pointer(0),
                                .int(t), .int(c.headCount), .int(c.kvHeadCount), .float(c.attentionScale),
                                .float(0), .int32(1 << 30)])  // no soft-capping, no window (attention.cu's entry points)
            } else {
                try ctx.attentionRows(qkv: qkvRows.pointer, stride: qkvDim, kcache: layer.keys.pointer, vcache: layer.values.pointer,
                                      out: att.pointer, slots: 0, positions: positions.pointer, rows: t, capacity: cacheRows,
                                      heads: c.headCount, kvHeads: c.kvHeadCount, headDim: c.headDim, scale: c.attentionScale,
                                      softcap: c.attentionSoftcap ?? 0, window: window, runStart: appendAfter ? runStart!.pointer : 0)
                if appendAfter {
                    try ctx.kvAppendRows(qkv: qkvRows.pointer, stride: qkvDim, kcache: layer.keys.pointer, vcache: layer.values.pointer,
                                         slots: 0, positions: positions.pointer, runEnd: runEnd!.pointer, rows: t, capacity: cacheRows,
                                         heads: c.headCount, kvHeads: c.kvHeadCount, headDim: c.headDim)
                }
            }
            try residual(layer.o, input: att.pointer, norm: layer.attentionOutputNorm)
            try ctx.rmsNormRows(x: xs.pointer, weight: layer.postNorm.pointer, out: normedRows.pointer, rows: t, dim: h, eps: eps, offset: offset)
            try group(layer.gateUp, input: normedRows.pointer, into: gateUp)
            try ctx.swigluRows(gateUp: gateUp.pointer, into: hiddenRows.pointer, rows: t, inter: inter, activation: c.mlpActivation)
            try residual(layer.down, input: hiddenRows.pointer, norm: layer.mlpOutputNorm)
        }
        length += t
        let firstRow = lastOnly ? t - 1 : 0, rows = t - firstRow
        try ctx.rmsNormRows(x: xs.address(at: firstRow * h), weight: finalNorm.pointer, out: normedRows.pointer, rows: rows, dim: h, eps: eps,
                            offset: offset)
        let out = try A.buffer(Float.self, count: rows * c.vocabularySize)
        try blas.gemm(m: rows, n: c.vocabularySize, k: h, a: normedRows.pointer, b: head.pointer, transB: true, c: out.pointer,
                      outputType: .float32)
        if let cap = c.finalLogitSoftcap { try ctx.softcapLogits(out.pointer, count: rows * c.vocabularySize, cap: cap) }
        return try out.download()
    }
}

// MARK: - Generation

/// The GPU's generation session: generation runs through `Generator.generate(session:...)` as on the CPU.
extension CUDAInference: InferenceSession {
    public func next(_ tokens: [Int]) throws -> [Float] { try forward(tokens: tokens, lastOnly: true) }
}

extension Generator {
    /// Generation on the GPU from an empty cache: prefill the prompt, then one token at a time through the decode graph.
    public static func generate(inference: CUDAInference, prompt: [Int], maxTokens: Int, sampling: SamplingOptions,
                                stopIDs: Set<Int>, onToken: (Int) -> Void = { _ in }) throws -> GenerationResult {
        inference.reset()
        return try generate(session: inference, prompt: prompt, maxTokens: maxTokens, sampling: sampling, stopIDs: stopIDs, onToken: onToken)
    }
}
