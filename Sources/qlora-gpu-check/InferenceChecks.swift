// GPU generation and GPU optimizer checks (called from main.swift's groups):
//   decode gemv        nf4_gemv (+ LoRA + residual) and bf16_gemv against fp64 sums over the dequantized weight;
//                      nf4_gemv_mma the same on weights with block scales spread 40x, over shapes that exercise its
//                      partial cycles, idle warps, short blocks and blocksize 128 (checkDecodeGemvMMA); lora_a_rows in
//                      every mode against the CPU (checkLoRAARows)
//   inference fixture  CUDAInference vs DecoderModel.forward on Tests/Fixtures/tiny-llama (+ its adapter), prefill and
//                      decode logits, both with the same NF4 weights (the CPU model gets the dequantized values)
//   inference random   the same on random weights of a larger shape (hidden 2048, GQA 16/4, head dim 128), r 16
//   adamw8bit          CUDAOptimizer vs the CPU AdamW8bit (states within 1 code, parameters within 1e-6), paged = unpaged
// Logit thresholds: the GPU keeps activations in bf16 (the CPU in fp32); 3e-2 relative (‖Δ‖/‖ref‖) over a row.

import QLoRA
#if canImport(Glibc)
import Glibc
#endif

/// fp64 y = W x (+ s B (A x)) + residual, W from a quantized weight.
func referenceGemv(_ w: [Float], rows: Int, cols: Int, x: [Float], residual: [Float]?, lora: (a: [Float], b: [Float], rank: Int, scale: Float)?) -> [Float] {
    var xa = [Double](repeating: 0, count: lora?.rank ?? 0)
    if let lora {
        for r in 0..<lora.rank { var s = 0.0; for c in 0..<cols { s += Double(lora.a[r * cols + c]) * Double(x[c]) }; xa[r] = s }
    }
    return (0..<rows).map { r in
        var s = 0.0
        for c in 0..<cols { s += Double(w[r * cols + c]) * Double(x[c]) }
        if let lora { for k in 0..<lora.rank { s += Double(lora.scale) * Double(lora.b[r * lora.rank + k]) * xa[k] } }
        if let residual { s += Double(residual[r]) }
        return Float(s)
    }
}

/// A decode GEMV case on the host (for the CPU twin) and the device: the NF4 weight of `w` and its dequantized values,
/// a bf16 x, a rank-`rank` LoRA (A, B) with xa = A·x made on the GPU by bf16_gemv, and a residual row.
struct GemvCase {
    let matrix: CUDANF4Weight
    let wq: [Float], x: [Float], a: [Float], b: [Float], residual: [Float]
    let residualBits: [UInt16]
    let xd: DeviceBuffer<UInt16>, ad: DeviceBuffer<UInt16>, bd: DeviceBuffer<UInt16>
    let xa: DeviceBuffer<Float>

    init(_ w: [Float], rows: Int, cols: Int, blocksize: Int = 64, rank: Int) throws {
        let q = try QuantizedWeight.quantize(w, shape: [rows, cols], blocksize: blocksize)
        wq = q.dequantize()
        matrix = try CUDANF4Weight(q, allocator: A)
        let (xb, x) = rng.bf16(cols)
        let (ab, a) = rng.bf16(rank * cols, -0.05, 0.05)
        let (bb, b) = rng.bf16(rows * rank, -0.05, 0.05)
        (residualBits, residual) = rng.bf16(rows)
        (self.x, self.a, self.b) = (x, a, b)
        xd = try upload(xb)
        bd = try upload(bb)
        ad = try upload(ab)
        xa = try poisoned(Float.self, rank)
        try ctx.bf16Gemv(weight: ad.pointer, x: xd.pointer, out: xa.pointer, rows: rank, cols: cols)
    }
}

func checkDecodeGemv() throws {
    let rows = 300, cols = 1024, rank = 16
    let c = try GemvCase(rng.floats(rows * cols, -0.05, 0.05), rows: rows, cols: cols, rank: rank)
    let (matrix, wq, x, a, b, residual, rb, xd, bd, xa) = (c.matrix, c.wq, c.x, c.a, c.b, c.residual, c.residualBits, c.xd, c.bd, c.xa)
    let refXa = referenceGemv(a, rows: rank, cols: cols, x: x, residual: nil, lora: nil)
    check("bf16 gemv (LoRA A) \(rank)x\(cols)", relativeError(try xa.download(), refXa), 1e-5)
    let out = try upload(rb)
    var task = NF4GemvTask(packed: matrix.packed.pointer, absmaxCodes: matrix.absmaxCodes.pointer, nestedAbsmax: matrix.nestedAbsmax.pointer,
                           code: matrix.code.pointer, offset: matrix.offset, rows: rows, out: out.pointer)
    task.residual = out.pointer
    task.loraB = bd.pointer
    task.xa = xa.pointer
    task.loraScale = 2
    task.rank = rank
    // A second task without LoRA or residual, in the same launch.
    let out2 = try poisoned(UInt16.self, rows)
    let task2 = NF4GemvTask(packed: matrix.packed.pointer, absmaxCodes: matrix.absmaxCodes.pointer, nestedAbsmax: matrix.nestedAbsmax.pointer,
                            code: matrix.code.pointer, offset: matrix.offset, rows: rows, out: out2.pointer)
    let (bytes, blocks) = NF4GemvTask.encode([task, task2])
    let tasks = try upload(bytes)
    try ctx.nf4Gemv(tasks: tasks.pointer, taskCount: 2, blocks: blocks, x: xd.pointer, cols: cols)
    let ref = referenceGemv(wq, rows: rows, cols: cols, x: x, residual: residual, lora: (a, b, rank, 2))
    check("nf4 gemv + LoRA + residual \(rows)x\(cols)", relativeError(try downloadBF16(out), ref), 1e-2)
    check("nf4 gemv, second task \(rows)x\(cols)",
          relativeError(try downloadBF16(out2), referenceGemv(wq, rows: rows, cols: cols, x: x, residual: nil, lora: nil)), 1e-2)
    // The split-K kernel, several splits (the residual buffer is a separate copy here).
    for splits in [1, 4, 8] {
        let res = try upload(rb), outS = try poisoned(UInt16.self, rows)
        var t = task
        t.residual = res.pointer
        t.out = outS.pointer
        let (b2, n2) = NF4GemvTask.encode([task2, t], rowsPerBlock: NF4GemvTask.splitKRowsPerBlock(splits))
        let td = try upload(b2)
        try out2.fill(byte: 0xFF)
        try ctx.nf4GemvSplitK(tasks: td.pointer, taskCount: 2, blocks: n2, x: xd.pointer, cols: cols, splits: splits)
        check("nf4 gemv split-K \(splits) + LoRA + residual", relativeError(try downloadBF16(outS), ref), 1e-2)
        check("nf4 gemv split-K \(splits), first task",
              relativeError(try downloadBF16(out2), referenceGemv(wq, rows: rows, cols: cols, x: x, residual: nil, lora: nil)), 1e-2)
    }
}

/// nf4_gemv_mma (pair lookup + tensor cores) against fp64 sums over the dequantized weight. The weights' 64-value
/// blocks get scales spread over 0.05x..2x, so a group summed with a neighbour's absmax shows; shapes: the two-task
/// launch with LoRA and residual, partial cycles of 4 groups (cols 64 · 37: warps own 8, 8, 8, 8 and 5 groups), one
/// group per row (cols 64, four warps idle), rows fewer than a block and not a multiple of 16, blocksize 128.
func checkDecodeGemvMMA() throws {
    guard ctx.nf4GemvMMASupported(cols: 64, blocksize: 64) else {
        checkTrue("nf4 gemv mma: not run (\(dt) on \(ctx.compiler.target.nvrtcArchitecture) has no tensor-core path)", true)
        return
    }
    let kernel = "mma"
    let shapes: [(rows: Int, cols: Int, blocksize: Int, lora: Bool)] = [
        (300, 1024, 64, true), (77, 64 * 37, 64, true), (5, 64, 64, false), (40, 4096, 128, true), (1000, 64 * 6, 64, false),
    ]
    for (rows, cols, blocksize, withLoRA) in shapes {
        let rank = 16
        var w = rng.floats(rows * cols, -1, 1)
        for b in 0..<(rows * cols / 64) {
            let s = rng.uniform(0.05, 2) * 0.05
            for i in (b * 64)..<((b + 1) * 64) { w[i] *= s }
        }
        let c = try GemvCase(w, rows: rows, cols: cols, blocksize: blocksize, rank: rank)
        let (matrix, wq, x, a, b, residual, rb, xd, bd, xa) = (c.matrix, c.wq, c.x, c.a, c.b, c.residual, c.residualBits, c.xd, c.bd, c.xa)
        let res = try upload(rb), out = try poisoned(UInt16.self, rows), out2 = try poisoned(UInt16.self, rows)
        var task = NF4GemvTask(packed: matrix.packed.pointer, absmaxCodes: matrix.absmaxCodes.pointer, nestedAbsmax: matrix.nestedAbsmax.pointer,
                               code: matrix.code.pointer, offset: matrix.offset, rows: rows, out: out.pointer)
        if withLoRA {
            task.residual = res.pointer
            task.loraB = bd.pointer
            task.xa = xa.pointer
            task.loraScale = 2
            task.rank = rank
        }
        var plain = task
        plain.out = out2.pointer
        plain.residual = 0
        plain.loraB = 0
        plain.xa = 0
        plain.rank = 0
        let (bytes, blocks) = NF4GemvTask.encode([plain, task])
        let tasks = try upload(bytes)
        try ctx.nf4GemvMMA(tasks: tasks.pointer, taskCount: 2, blocks: blocks, x: xd.pointer, cols: cols, blocksize: blocksize,
                           nestedBlocksize: matrix.nestedBlocksize)
        let name = "nf4 gemv \(kernel) \(rows)x\(cols) blocksize \(blocksize)"
        let ref = referenceGemv(wq, rows: rows, cols: cols, x: x, residual: withLoRA ? residual : nil, lora: withLoRA ? (a, b, rank, 2) : nil)
        check(name + (withLoRA ? " + LoRA + residual" : ""), relativeError(try downloadBF16(out), ref), 1e-2)
        check(name + ", first task", relativeError(try downloadBF16(out2),
                                                   referenceGemv(wq, rows: rows, cols: cols, x: x, residual: nil, lora: nil)), 1e-2)
    }
}

/// The input of a group's projection as lora_a_rows makes it, on the CPU: mode 0 x, 1 RMSNorm(x)·w
/// (bf16(bf16(x r) w), or bf16(x r (w + offset)) with a norm offset), 2 act(x)·x2 (SiLU or GELU-tanh), rounded to h16.
func referenceDecodeInput(mode: Int, x: [Float], x2: [Float], w: [Float], offset: Float, activation: MLPActivation) -> [Float] {
    func round(_ v: Float) -> Float { dt.decode(dt.encode(v)) }
    var r: Float = 1
    if mode == 1 {
        var ss = 0.0
        for v in x { ss += Double(v) * Double(v) }
        r = Float(1 / (ss / Double(x.count) + 1e-5).squareRoot())
    }
    return x.indices.map { i in
        switch mode {
        case 1: return offset != 0 ? round(x[i] * r * (w[i] + offset)) : round(round(x[i] * r) * w[i])
        case 2:
            let g = x[i]
            let act = activation == .silu ? g / (1 + expf(-g)) : 0.5 * g * (1 + tanhf(0.7978845608028654 * (g + 0.044715 * g * g * g)))
            return round(act * x2[i])
        default: return x[i]
        }
    }
}

/// lora_a_rows (a group's LoRA A rows with the op making their input fused in) against the CPU in fp64, every mode:
/// plain x, RMSNorm (Llama's bf16(bf16(x r) w) and Gemma's x r (w + 1)), SwiGLU and GeGLU; cols 4096 (each thread's
/// groups held in registers), 20480 (groups beyond those, in the loops), 72 (one warp); rows 0 (only `in` written).
func checkLoRAARows() throws {
    let modes: [(mode: Int, offset: Float, activation: MLPActivation, label: String)] = [
        (0, 0, .silu, "x"), (1, 0, .silu, "rmsnorm"), (1, 1, .silu, "rmsnorm (1 + w)"), (2, 0, .silu, "swiglu"), (2, 0, .geluTanh, "geglu"),
    ]
    for (cols, rows) in [(4096, 48), (20480, 16), (72, 3), (4096, 0)] {
        let (xb, x) = rng.bf16(cols, -2, 2)
        let (x2b, x2) = rng.bf16(cols, -1, 1)
        let (wb, w) = rng.bf16(cols, 0.5, 1.5)
        let (ab, a) = rng.bf16(max(rows, 1) * cols, -0.05, 0.05)
        let xd = try upload(xb), x2d = try upload(x2b), wd = try upload(wb), ad = try upload(ab)
        for m in modes {
            let inOut = try poisoned(UInt16.self, cols), xa = try poisoned(Float.self, max(rows, 1))
            try ctx.loraARows(a: ad.pointer, x: xd.pointer, x2: x2d.pointer, normWeight: wd.pointer, inOut: inOut.pointer, xa: xa.pointer,
                              rows: rows, cols: cols, mode: m.mode, eps: 1e-5, normOffset: m.offset, activation: m.activation)
            let inRef = referenceDecodeInput(mode: m.mode, x: x, x2: x2, w: w, offset: m.offset, activation: m.activation)
            let name = "lora A rows, \(m.label), \(rows)x\(cols)"
            check(name + ": in", relativeError(try downloadBF16(inOut), inRef), 5e-3)
            if rows > 0 {
                let xaRef = referenceRowProducts(a, inRef, rows: rows, columns: cols)
                check(name + ": xa", relativeError(Array(try xa.download()[0..<rows]), xaRef), 5e-3)
            }
        }
    }
}

/// The NF4 GEMVs of batch-1 decode at the Llama-3.1-8B layer shapes, each kernel on the same random codes and scales,
/// as the decode step launches them (q|k|v and gate|up as one launch of several tasks, LoRA r 16 on every matrix, the
/// residual on o and down). Several copies of each weight are cycled so the bytes come from HBM, not the 50 MB L2, as
/// in a decode step. GB/s counts the weight bytes read: packed codes, absmax codes, nested absmax.
func timeDecodeGemvs() throws {
    let shapes: [(name: String, cols: Int, parts: [Int])] = [
        ("q|k|v 4096->6144", 4096, [4096, 1024, 1024]), ("o 4096->4096", 4096, [4096]),
        ("gate|up 4096->28672", 4096, [14336, 14336]), ("down 14336->4096", 14336, [4096]),
    ]
    let budget = 160 << 20  // packed bytes of all copies of a shape
    var r = SeededGenerator(seed: seed ^ 0x6e6d76)
    let packed = try upload((0..<(budget / 8)).map { _ in r.next() })
    let absmax = try upload((0..<(budget / 32 / 8 + 1)).map { _ in r.next() })
    let nested = try upload((0..<(budget / 32 / 256 + 1)).map { _ in r.uniform(0.005, 0.02) })
    let code = try upload((0..<256).map { Float($0 - 128) / 128 })
    let rank = 16
    let loraB = try upload((0..<(28672 * rank)).map { _ in dt.encode(r.uniform(-0.05, 0.05)) })
    let xa = try upload((0..<64).map { _ in r.uniform(-1, 1) })
    let x = try upload((0..<14336).map { _ in dt.encode(r.uniform(-1, 1)) })
    // The LoRA A rows and the input ops of lora_a_rows (launched before each GEMV in decode).
    let loraA = try upload((0..<(3 * rank * 14336)).map { _ in dt.encode(r.uniform(-0.05, 0.05)) })
    let normWeight = try upload((0..<14336).map { _ in dt.encode(r.uniform(0.5, 1.5)) })
    let inOut = try A.buffer(UInt16.self, count: 14336)
    let out = try A.buffer(UInt16.self, count: 28672), residual = try upload([UInt16](repeating: dt.encode(0.5), count: 4096))
    for (name, cols, parts) in shapes {
        let rows = parts.reduce(0, +)
        // As decode makes each group's input: q|k|v and gate|up RMSNorm, o plain, down the gated activation.
        let mode = name.hasPrefix("o ") ? 0 : name.hasPrefix("down") ? 2 : 1
        let bytes = rows * cols / 2
        let copies = max(2, budget / bytes)
        var perKernel: [(tasks: [DeviceBuffer<UInt8>], blocks: Int)] = []
        for rowsPerBlock in [NF4GemvTask.rowsPerBlock, NF4GemvTask.splitKRowsPerBlock(NF4GemvTask.splits(cols: cols))] {
            var buffers: [DeviceBuffer<UInt8>] = [], blocks = 0
            for c in 0..<copies {
                var tasks: [NF4GemvTask] = [], row = 0
                for p in parts {
                    let e0 = c * bytes * 2 + row * cols  // first element of this matrix in the copy
                    var t = NF4GemvTask(packed: packed.pointer + UInt64(e0 / 2), absmaxCodes: absmax.pointer + UInt64(e0 / 64),
                                        nestedAbsmax: nested.pointer, code: code.pointer, offset: 0.01, rows: p, out: out.address(at: row))
                    t.loraB = loraB.pointer
                    t.xa = xa.pointer
                    t.loraScale = 2
                    t.rank = rank
                    if parts.count == 1 { t.residual = residual.pointer }
                    tasks.append(t)
                    row += p
                }
                let (encoded, n) = NF4GemvTask.encode(tasks, rowsPerBlock: rowsPerBlock)
                buffers.append(try upload(encoded))
                blocks = n
            }
            perKernel.append((buffers, blocks))
        }
        let weightBytes = Double(bytes) + Double(rows * cols) / 64 + Double(rows * cols) / 64 / 256 * 4
        // Each kernel alone (events around one launch: its latency counts in full) and 8 launches in a row, cycling the
        // copies (per launch: as in a decode step, where a launch follows another kernel). "lora A + mma" is the pair of
        // launches decode makes for a group (lora_a_rows: the input op and xa; then the GEMV).
        var kernels: [(String, () throws -> Void)] = []
        var k = 0
        kernels.append(("rows", {
            k += 1
            try ctx.nf4Gemv(tasks: perKernel[0].tasks[k % copies].pointer, taskCount: parts.count, blocks: perKernel[0].blocks,
                            x: x.pointer, cols: cols)
        }))
        kernels.append(("splitk", {
            k += 1
            try ctx.nf4GemvSplitK(tasks: perKernel[1].tasks[k % copies].pointer, taskCount: parts.count, blocks: perKernel[1].blocks,
                                  x: x.pointer, cols: cols, splits: NF4GemvTask.splits(cols: cols))
        }))
        if ctx.nf4GemvMMASupported(cols: cols, blocksize: 64) {
            kernels.append(("mma", {
                k += 1
                try ctx.nf4GemvMMA(tasks: perKernel[0].tasks[k % copies].pointer, taskCount: parts.count, blocks: perKernel[0].blocks,
                                   x: x.pointer, cols: cols)
            }))
            kernels.append(("lora A + mma", {
                k += 1
                try ctx.loraARows(a: loraA.pointer, x: x.pointer, x2: x.pointer, normWeight: normWeight.pointer, inOut: inOut.pointer,
                                  xa: xa.pointer, rows: parts.count * rank, cols: cols, mode: mode, eps: 1e-5)
                try ctx.nf4GemvMMA(tasks: perKernel[0].tasks[k % copies].pointer, taskCount: parts.count, blocks: perKernel[0].blocks,
                                   x: mode == 0 ? x.pointer : inOut.pointer, cols: cols)
            }))
        }
        for (kernel, launch) in kernels {
            let single = try timeMedian { try launch() }
            let inRow = try timeMedian { for _ in 0..<8 { try launch() } } / 8
            print("  \(pad("nf4 gemv " + name + " (" + kernel + ")", 50)) \(pad(fmt(single * 1000, 1) + " us", 12)) "
                  + "\(pad(fmt(weightBytes / (single / 1000) / 1e9, 0) + " GB/s", 11)) 8 in a row: \(pad(fmt(inRow * 1000, 1) + " us", 12)) "
                  + "\(fmt(weightBytes / (inRow / 1000) / 1e9, 0)) GB/s")
        }
    }
}

/// Compares GPU and CPU logits: a prefill of `prompt`, then `decodeSteps` tokens one at a time (greedy from the CPU).
func compareInference(_ name: String, model: DecoderModel, prompt: [Int], decodeSteps: Int, threshold: Double) throws {
    let quantized = try CUDAInference.quantizeBase(model, replacingCPUWeights: true)
    let gpu = try CUDAInference(context: ctx, model: model, capacity: prompt.count + decodeSteps + 1, quantized: quantized)
    let cache = KVCache(config: model.config, capacity: prompt.count + decodeSteps + 1)
    let cpuLogits = try model.forward(tokens: prompt, cache: cache)
    let gpuLogits = try gpu.forward(tokens: prompt)
    check("\(name): prefill logits (\(prompt.count) tokens)", relativeError(gpuLogits, cpuLogits), threshold)
    let v = model.config.vocabularySize
    // CPU decode, greedy; then the same tokens through each GPU GEMV kernel, with and without the graph.
    var next = argmax(Array(cpuLogits[((prompt.count - 1) * v)...]))
    var fed: [Int] = [], cpuRows: [[Float]] = []
    for _ in 0..<decodeSteps {
        fed.append(next)
        let c = try model.forward(tokens: [next], cache: cache, lastOnly: true)
        cpuRows.append(c)
        next = argmax(c)
    }
    var graphed: [Float] = []
    for kernel in CUDAInference.GEMVKernel.allCases {
        for graph in [true, false] {
            gpu.gemvKernel = kernel
            gpu.useGraph = graph
            gpu.reset()
            _ = try gpu.forward(tokens: prompt)
            var worst = 0.0, agree = 0
            var last: [Float] = []
            for (k, token) in fed.enumerated() {
                last = try gpu.forward(tokens: [token], lastOnly: true)
                worst = max(worst, relativeError(last, cpuRows[k]))
                if argmax(last) == argmax(cpuRows[k]) { agree += 1 }
            }
            check("\(name): decode logits, \(kernel.rawValue)\(graph ? ", graph" : ", plain") (\(decodeSteps) steps, worst)", worst, threshold,
                  "greedy token agrees \(agree)/\(decodeSteps)")
            if graph { graphed = last } else { check("\(name): \(kernel.rawValue) graph replay = plain launches", relativeError(graphed, last), 0) }
        }
    }
}

func argmax(_ x: [Float]) -> Int {
    var best = 0
    for i in x.indices where x[i] > x[best] { best = i }
    return best
}

func checkInferenceFixture() throws {
    let dir = "Tests/Fixtures/tiny-llama"
    let loaded = try ModelLoader.load(dir + "/base", quantization: .none)
    _ = try PEFTAdapter.load(directory: dir + "/adapter", into: loaded.model)
    try compareInference("tiny-llama + adapter", model: loaded.model, prompt: [1, 17, 345, 99, 500, 3, 42, 7, 810], decodeSteps: 8,
                         threshold: 3e-2)
}

func checkInferenceRandom() throws {
    let json = try JSONValue.parse(bytes: Array("""
    {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 3, "num_attention_heads": 16,
     "num_key_value_heads": 4, "vocab_size": 32000, "rope_theta": 500000.0, "tie_word_embeddings": false, "rms_norm_eps": 1e-5,
     "max_position_embeddings": 4096}
    """.utf8))
    let config = try DecoderConfig(json: json, file: "random check")
    let model = DecoderModel.random(config: config, seed: seed)
    let r = 16
    for l in model.linearLayers {
        let a = Matrix(rows: r, columns: l.inFeatures, values: rng.floats(r * l.inFeatures, -0.02, 0.02).map(dt.round))
        let b = Matrix(rows: l.outFeatures, columns: r, values: rng.floats(l.outFeatures * r, -0.02, 0.02).map(dt.round))
        l.lora = LoRAAdapter(a: a, b: b, scale: 2)
    }
    let prompt = (0..<70).map { _ in rng.int(config.vocabularySize) }
    try compareInference("random 2048/5632 x3, r16", model: model, prompt: prompt, decodeSteps: 6, threshold: 3e-2)
}

func checkAdamW8bit() throws {
    let sizes = [5000, (1 << 16) + 3, 1000]
    let hyper = AdamWHyperparameters(weightDecay: 0.01)
    var params = sizes.enumerated().map { ParameterTensor(name: "p\($0.offset)", shape: [$0.element], values: rng.floats($0.element, -1, 1)) }
    let initial = params
    let cpu = try AdamW8bit(hyper, kind: .adamw8bit)
    func devices(_ ps: [ParameterTensor]) throws -> [CUDAParameterSlot] {
        try ps.map { CUDAParameterSlot(name: $0.name, values: try upload($0.values), gradient: try A.buffer(Float.self, count: $0.values.count)) }
    }
    let unpaged = try CUDAOptimizer(context: ctx, kind: .adamw8bit, hyper)
    let paged = try CUDAOptimizer(context: ctx, kind: .pagedAdamw8bit, hyper)
    let slotsU = try devices(initial), slotsP = try devices(initial)
    for step in 1...4 {
        var grads = sizes.map { rng.floats($0, -0.1, 0.1) }
        if step == 2 { grads[0][7] = .nan; grads[1][300] = .infinity }
        for (i, g) in grads.enumerated() {
            try slotsU[i].gradient.upload(g)
            try slotsP[i].gradient.upload(g)
        }
        try cpu.step(parameters: &params, gradients: grads, learningRate: 1e-2)
        try unpaged.step(slotsU, learningRate: 1e-2)
        try paged.step(slotsP, learningRate: 1e-2)
    }
    var worstParam = 0.0, worstCode = 0, codeDiffs = 0, worstAbsmax = 0.0
    for (i, p) in params.enumerated() {
        let g = try slotsU[i].values.download()
        for k in g.indices { worstParam = max(worstParam, Double(abs(g[k] - p.values[k]))) }
    }
    let cpuState = Dictionary(uniqueKeysWithValues: cpu.state().map { ($0.name, $0) })
    let gpuState = try unpaged.state(), pagedState = try paged.state()
    var namesMatch = cpuState.count == gpuState.count
    for r in gpuState {
        guard let c = cpuState[r.name], c.data.count == r.data.count else { namesMatch = false; continue }
        if r.dtype == .u8 {
            for k in r.data.indices {
                let d = abs(Int(r.data[k]) - Int(c.data[k]))
                worstCode = max(worstCode, d)
                if d != 0 { codeDiffs += 1 }
            }
        } else if r.dtype == .f32 {
            let a = r.data.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }, b = c.data.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
            worstAbsmax = max(worstAbsmax, relativeError(a, b))
        }
    }
    checkTrue("adamw8bit: state names and sizes = CPU", namesMatch, "\(gpuState.count) records")
    checkTrue("adamw8bit 4 steps: 8-bit codes within 1 of CPU", worstCode <= 1, "\(codeDiffs) codes differ, most by \(worstCode)")
    check("adamw8bit 4 steps: absmax and fp32 moments", worstAbsmax, 1e-6)
    check("adamw8bit 4 steps: parameters (max abs diff)", worstParam, 1e-6)
    let same = zip(gpuState, pagedState).allSatisfy { $0.name == $1.name && $0.data == $1.data }
    var pagedParams = true
    for i in sizes.indices where try slotsU[i].values.download() != slotsP[i].values.download() { pagedParams = false }
    checkTrue("paged adamw8bit = adamw8bit (state and parameters)", same && pagedParams,
              "device state bytes: paged \(paged.deviceStateBytes), unpaged \(unpaged.deviceStateBytes)")
    // paged 32-bit vs the CPU's bitsandbytes 32-bit arithmetic.
    var p32 = initial
    let cpu32 = try OptimizerKind.pagedAdamw32bit.make(hyper)
    let gpu32 = try CUDAOptimizer(context: ctx, kind: .pagedAdamw32bit, hyper)
    let slots32 = try devices(initial)
    for _ in 1...3 {
        let grads = sizes.map { rng.floats($0, -0.1, 0.1) }
        for (i, g) in grads.enumerated() { try slots32[i].gradient.upload(g) }
        try cpu32.step(parameters: &p32, gradients: grads, learningRate: 1e-2)
        try gpu32.step(slots32, learningRate: 1e-2)
    }
    var worst32 = 0.0
    for (i, p) in p32.enumerated() { worst32 = max(worst32, relativeError(try slots32[i].values.download(), p.values)) }
    check("paged adamw32bit 3 steps: parameters vs CPU", worst32, 1e-6)
}

/// The CPU twin of the LoRA A rows: row j of `matrix` [rows, columns] dotted with `x`, summed in Double.
func referenceRowProducts(_ matrix: [Float], _ x: [Float], rows: Int, columns: Int) -> [Float] {
    (0..<rows).map { j in
        var s = 0.0
        for i in 0..<columns { s += Double(matrix[j * columns + i]) * Double(x[i]) }
        return Float(s)
    }
}
