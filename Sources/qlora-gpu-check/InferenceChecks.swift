// GPU generation and GPU optimizer checks (called from main.swift's groups):
//   decode gemv        nf4_gemv (+ LoRA + residual) and bf16_gemv against fp64 sums over the dequantized weight
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

func checkDecodeGemv() throws {
    let rows = 300, cols = 1024, rank = 16
    let w = rng.floats(rows * cols, -0.05, 0.05)
    let q = try QuantizedWeight.quantize(w, shape: [rows, cols])
    let wq = q.dequantize()
    let matrix = try CUDANF4Weight(q, allocator: A)
    let (xb, x) = rng.bf16(cols)
    let (ab, a) = rng.bf16(rank * cols, -0.05, 0.05)
    let (bb, b) = rng.bf16(rows * rank, -0.05, 0.05)
    let (rb, residual) = rng.bf16(rows)
    let xd = try upload(xb), ad = try upload(ab), bd = try upload(bb)
    let xa = try poisoned(Float.self, rank)
    try ctx.bf16Gemv(weight: ad.pointer, x: xd.pointer, out: xa.pointer, rows: rank, cols: cols)
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
