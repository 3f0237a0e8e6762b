// qlora-gpu-check: runs every CUDA op on fresh random inputs against the naive CPU reference
// (QLoRA.CPUReference), checks cuBLASLt GEMMs, the kernel cache and the allocator, then times a few ops and
// measures the copy bandwidth and the bf16 GEMM rate. Prints one line per check and `N passed, M failed`;
// exits nonzero when anything failed.
//
// Error measure: ‖gpu − ref‖ / ‖ref‖ over the whole output (NaN fails). Thresholds:
//   bf16 outputs whose inputs are exact bf16 values: 1e-2 (one bf16 rounding is ≤ 2^-9 relative per element,
//     about 1e-3 in this norm; the margin covers rounding inside HF's formulas and fast exp);
//   NF4 dequantization to bf16: 4e-3 (only the final rounding differs);
//   fp32 outputs (losses, AdamW parameters and moments, fp32 GEMMs): 1e-4 / 1e-5 as stated per check;
//   exact ops (embedding lookup, counts): 0.
// With --compute-dtype fp16 every kernel and GEMM stores fp16 instead (random inputs are fp16 values, the CPU twins
// round where the GPU stores, in fp16): the thresholds above stay as they are. fp16's rounding step is 2^-11 relative
// (bf16's 2^-8), so an fp16 run's errors come out about 8x below a bf16 run's on the same inputs, and a kernel that
// read fp16 bits as bf16 (or the reverse) gives errors of order 1, far above every threshold.
// Usage: qlora-gpu-check [--seed N] [--no-bench] [--only GROUP,...] [--arch compute_XY|sm_XY] [--compute-dtype auto|bf16|fp16]
//                        [--compile-only sm_75,sm_80,sm_86,sm_89,sm_90a (NVRTC only, no GPU needed)]
// --compile-only compiles each target for both storage types (bf16 and fp16; fp16 only before 8.0), or for the one
// --compute-dtype names.
// --arch runs every check on kernels built for that target: compute_80 gives PTX that holds only sm_80
// instructions, which the driver compiles for the card at load, so the portable paths run for real on a newer GPU
// (with that architecture's shared-memory limit, so launchers pick what such a card would get).
// Groups: compile, nf4 (and the trainer's tiles kernel: NF4Checks.swift), rmsnorm, rope, swiglu, embedding, cross entropy, adamw, gemm, attention, attention variations
// (scale, soft-capping, sliding window, head dims 32-256; AttentionFamilyChecks.swift), attention d256 (the flash
// kernels at Gemma's head dimension: tiles, GQA, windows, caps; AttentionFamilyChecks.swift), attention wgmma (the
// Hopper d128 forward on wgmma against the CPU twin and the mma.sync kernel; AttentionWGMMAChecks.swift), lora linear,
// decode gemv, inference fixture, inference random, dropout mask, lora dropout fused (DropoutChecks.swift), adamw8bit,
// batched kernels, batched generation (BatchedChecks.swift), family generation (qwen3, gemma2, gemma3_text, phi3, phi3
// longrope, mistral: FamilyInferenceChecks.swift), merge (MergeChecks.swift), allocator,
// training (fixture parity, forward-only loss, short run, engines, dropout, LoRA ranks, memory plan), memory
// (offloaded checkpoints and the host embedding bit-identical, peak bytes; MemoryChecks.swift), qwen2 (trainer and
// inference with biases), family rmsnorm / gated activation / rope / embedding / softcap / copy columns (the model
// families' element-wise ops; FamilyOpChecks.swift), nccl (a world of one and the Trainer's data-parallel path;
// NCCLChecks.swift), cross entropy: vocabulary slices and nccl: ... vocabulary-parallel head (VocabularyParallelChecks.swift),
// benchmarks.

import QLoRA
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Random inputs

/// Random inputs from the library's SplitMix64 generator: reproducible from the printed seed.
extension SeededGenerator {
    mutating func uniform(_ lo: Float, _ hi: Float) -> Float {
        lo + (hi - lo) * Float(next() >> 40) / Float(1 << 24)
    }
    mutating func int(_ n: Int) -> Int { Int(next() % UInt64(n)) }
    /// n values in [lo, hi) rounded to the run's 16-bit type `dt` (bf16 or fp16): (bits, values).
    mutating func bf16(_ n: Int, _ lo: Float = -1, _ hi: Float = 1) -> ([UInt16], [Float]) {
        var bits = [UInt16](), values = [Float]()
        bits.reserveCapacity(n)
        values.reserveCapacity(n)
        for _ in 0..<n {
            let b = dt.encode(uniform(lo, hi))
            bits.append(b)
            values.append(dt.decode(b))
        }
        return (bits, values)
    }
    mutating func floats(_ n: Int, _ lo: Float = -1, _ hi: Float = 1) -> [Float] { (0..<n).map { _ in uniform(lo, hi) } }
    mutating func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8(truncatingIfNeeded: next()) } }
}

// MARK: - Reporting

var passed = 0, failed = 0

func relativeError(_ a: [Float], _ b: [Float]) -> Double {
    guard a.count == b.count else { return .infinity }
    var diff = 0.0, norm = 0.0
    for i in a.indices {
        if a[i].isNaN { return .nan }
        let d = Double(a[i]) - Double(b[i])
        diff += d * d
        norm += Double(b[i]) * Double(b[i])
    }
    return norm == 0 ? diff.squareRoot() : (diff / norm).squareRoot()
}

func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }

func fmt(_ x: Double, _ digits: Int = 2) -> String {
    if x.isNaN { return "nan" }
    if x == 0 { return "0" }
    if abs(x) < 0.1 || abs(x) >= 1e6 {  // scientific with `digits` decimals, by hand (no Foundation formatting)
        var e = 0, m = abs(x)
        while m >= 10 { m /= 10; e += 1 }
        while m < 1 { m *= 10; e -= 1 }
        let scale = pow(10.0, Double(digits))
        return (x < 0 ? "-" : "") + "\((m * scale).rounded() / scale)e\(e)"
    }
    let scale = pow(10.0, Double(digits))
    return "\((x * scale).rounded() / scale)"
}

/// Records one comparison: passes when the relative error is finite and at most `threshold`.
func check(_ name: String, _ error: Double, _ threshold: Double, _ note: String = "") {
    let ok = error.isFinite && error <= threshold
    if ok { passed += 1 } else { failed += 1 }
    print("\(ok ? "PASS" : "FAIL")  \(pad(name, 44)) rel.err \(pad(fmt(error), 10)) (max \(fmt(threshold)))\(note.isEmpty ? "" : "  " + note)")
}

func checkTrue(_ name: String, _ condition: Bool, _ note: String = "") {
    if condition { passed += 1 } else { failed += 1 }
    print("\(condition ? "PASS" : "FAIL")  \(pad(name, 44)) \(note)")
}

/// Runs one group of checks; an error (compile failure, CUDA error) fails the group and the run goes on.
func group(_ name: String, _ body: () throws -> Void) {
    if !onlyGroups.isEmpty && !onlyGroups.contains(where: { name.contains($0) }) { return }
    do { try body() } catch {
        failed += 1
        print("FAIL  \(pad(name, 44)) \(error)")
    }
}

// MARK: - Setup

var seed = UInt64(UInt32(truncatingIfNeeded: time(nil))) &* 2_654_435_761
var runBench = true
var compileOnlyTargets: [String]? = nil
var kernelTarget: KernelTarget? = nil
var computeDTypeChoice: ComputeDTypeChoice? = nil
/// The 16-bit type of this run's kernels (set once the context is made): random inputs and CPU twins round to it.
var dt = ComputeDType.bf16
/// Only groups whose name contains one of these run (all when empty), e.g. to run one op under compute-sanitizer.
var onlyGroups: [String] = []
var arguments = CommandLine.arguments.dropFirst().makeIterator()
while let a = arguments.next() {
    switch a {
    case "--seed": seed = UInt64(arguments.next() ?? "") ?? seed
    case "--no-bench": runBench = false
    case "--compile-only": compileOnlyTargets = (arguments.next() ?? "sm_90a").split(separator: ",").map(String.init)
    case "--only": onlyGroups += (arguments.next() ?? "").split(separator: ",").map(String.init)
    case "--arch":
        do { kernelTarget = try KernelTarget(parsing: arguments.next() ?? "") } catch {
            print("\(error)")
            exit(2)
        }
    case "--compute-dtype":
        do { computeDTypeChoice = try ComputeDTypeChoice(parsing: arguments.next() ?? "") } catch {
            print("\(error)")
            exit(2)
        }
    default:
        print("usage: qlora-gpu-check [--seed N] [--no-bench] [--only GROUP,...] [--arch compute_XY|sm_XY] [--compute-dtype auto|bf16|fp16] "
              + "[--compile-only sm_XY,...]")
        exit(2)
    }
}
var rng = SeededGenerator(seed: seed)

// Without a GPU: compile every kernel with NVRTC, with the options the backend uses, for each listed target
// (cubins for sm_XY run ptxas too, so an instruction a target lacks is caught here).
if let targets = compileOnlyTargets {
    do {
        let nvrtc = try NVRTC()
        print("NVRTC \(nvrtc.version.major).\(nvrtc.version.minor)")
        for text in targets {
            let target = try KernelTarget(parsing: text)
            let dtypes: [ComputeDType]
            switch computeDTypeChoice {
            case .fp16: dtypes = [.fp16]
            case .bf16: dtypes = [try ComputeDTypeChoice.bf16.resolve(major: target.major, minor: target.minor, cardName: text)]
            case .auto: dtypes = [try ComputeDTypeChoice.auto.resolve(major: target.major, minor: target.minor)]
            case nil: dtypes = target.hasBF16TensorCores ? [.bf16, .fp16] : [.fp16]
            }
            for dtype in dtypes {
                for source in KernelSources.all {
                    group("compile \(source.name)") {
                        let image = try nvrtc.compile(source: source.text, name: source.name, headers: KernelSources.headers,
                                                      options: KernelCompiler.options(for: target, computeDType: dtype))
                        checkTrue("compile \(source.name) for \(target.nvrtcArchitecture) \(dtype)", !image.isEmpty,
                                  "\(image.count) bytes of \(target.isVirtual ? "PTX" : "cubin")")
                    }
                }
            }
        }
    } catch {
        print("FAIL  \(error)")
        failed += 1
    }
    print("\(passed) passed, \(failed) failed")
    exit(failed > 0 ? 1 : 0)
}

let cacheDir = "/tmp/qlora-gpu-check-kernels-\(getpid())"
let ctx: CUDAContext
do {
    ctx = try CUDAContext(kernelCacheDirectory: cacheDir, kernelTarget: kernelTarget, computeDType: computeDTypeChoice)
} catch {
    print("cannot open a CUDA device: \(error)")
    print("0 passed, 1 failed")
    exit(2)
}
let dev = ctx.device
dt = ctx.computeDType
print("device: \(dev.name), compute capability \(dev.computeCapability.major).\(dev.computeCapability.minor), "
      + "\(dev.multiprocessorCount) SMs, \(fmt(Double(dev.totalMemory) / Double(1 << 30))) GiB; driver CUDA \(ctx.driver.version); "
      + "NVRTC \(ctx.compiler.nvrtc.version.major).\(ctx.compiler.nvrtc.version.minor) -> \(ctx.kernelDescription); seed \(seed)")

let A = ctx.allocator

func upload<T>(_ values: [T]) throws -> DeviceBuffer<T> { try A.buffer(copying: values) }
/// An output buffer filled with 0xFF bytes (NaN as float or bf16), so unwritten elements fail the check.
func poisoned<T>(_ type: T.Type, _ count: Int) throws -> DeviceBuffer<T> {
    let b = try A.buffer(T.self, count: count)
    try b.fill(byte: 0xFF)
    return b
}
func downloadBF16(_ b: DeviceBuffer<UInt16>) throws -> [Float] { try b.download().map(dt.decode) }

// MARK: - Kernel compilation and cache

group("compile all kernels") {
    var seconds = 0.0
    let start = clock()
    for source in KernelSources.all { _ = try ctx.compiler.module(source) }
    seconds = Double(clock() - start) / Double(CLOCKS_PER_SEC)
    checkTrue("compile all kernels (NVRTC)", ctx.compiler.compilations == KernelSources.all.count,
              "\(ctx.compiler.compilations) files compiled for \(ctx.compiler.target.nvrtcArchitecture) in \(fmt(seconds)) s CPU")
    let again = KernelCompiler(device: dev, nvrtc: ctx.compiler.nvrtc, target: ctx.compiler.target, computeDType: ctx.computeDType,
                               cacheDirectory: cacheDir)
    for source in KernelSources.all { _ = try again.module(source) }
    checkTrue("kernel cache reload", again.cacheHits == KernelSources.all.count && again.compilations == 0,
              "\(again.cacheHits) cubins loaded from \(cacheDir)")
}

group("compile error carries the log") {
    do {
        _ = try ctx.compiler.module(KernelSource(name: "broken.cu", text: "extern \"C\" __global__ void k() { undefined_thing(); }"))
        checkTrue("compile error carries the log", false, "a broken kernel compiled")
    } catch let error as CUDAError {
        let text = "\(error)"
        checkTrue("compile error carries the log", text.contains("broken.cu") && text.contains("undefined_thing"),
                  text.split(separator: "\n").first.map(String.init) ?? "")
    }
}

// MARK: - Op checks

group("nf4") {
    // Double-quantized absmax, 1027 blocks of 64 (5 nested blocks, the last partial).
    let blocks = 1027, count = blocks * 64
    let packed = rng.bytes(count / 2)
    let quantized = rng.bytes(blocks)
    let code = (0..<256).map { Float($0 - 128) / 128 }  // any 256-entry map will do for a dequantizer
    let nested = rng.floats((blocks + 255) / 256, 0.01, 0.05)
    let offset: Float = 0.03
    let absmax = CPUReference.doubleQuantAbsmax(quantized: quantized, code: code, nestedAbsmax: nested, offset: offset)
    let reference = CPUReference.nf4Dequantize(packed: packed, absmax: absmax, blocksize: 64, count: count)
    let out = try poisoned(UInt16.self, count)
    try ctx.nf4Dequantize(packed: upload(packed),
                          scales: .doubleQuant(quantized: upload(quantized), code: upload(code), nestedAbsmax: upload(nested),
                                               offset: offset, nestedBlocksize: 256),
                          count: count, into: out)
    check("nf4 dequantize, double quant (\(count))", relativeError(try downloadBF16(out), reference), 4e-3)

    // fp32 absmax, a ragged count (partial last block, odd length).
    let ragged = 1003
    let packed2 = rng.bytes((ragged + 1) / 2), absmax2 = rng.floats((ragged + 63) / 64, 0.1, 2)
    let out2 = try poisoned(UInt16.self, ragged)
    try ctx.nf4Dequantize(packed: upload(packed2), scales: .float32(absmax: upload(absmax2)), count: ragged, into: out2)
    check("nf4 dequantize, fp32 absmax, ragged (\(ragged))",
          relativeError(try downloadBF16(out2), CPUReference.nf4Dequantize(packed: packed2, absmax: absmax2, count: ragged)), 4e-3)
    try checkNF4Tiles()  // NF4Checks.swift: the trainer's tiles kernel, bit for bit
}

group("rmsnorm") {
    for (rows, dim) in [(64, 4096), (7, 1003)] {
        let (xb, x) = rng.bf16(rows * dim, -2, 2)
        let (wb, w) = rng.bf16(dim, 0.5, 1.5)
        let (dyb, dy) = rng.bf16(rows * dim)
        let eps: Float = 1e-5
        let xd = try upload(xb), wd = try upload(wb)
        let y = try poisoned(UInt16.self, rows * dim)
        try ctx.rmsNormForward(x: xd, weight: wd, into: y, rows: rows, dim: dim, eps: eps)
        check("rmsnorm forward \(rows)x\(dim)", relativeError(try downloadBF16(y),
              CPUReference.rmsNormForward(x: x, weight: w, rows: rows, dim: dim, eps: eps, round: dt.round)), 1e-2)
        let dx = try poisoned(UInt16.self, rows * dim)
        try ctx.rmsNormBackward(x: xd, weight: wd, dy: upload(dyb), into: dx, rows: rows, dim: dim, eps: eps)
        let refDx = CPUReference.rmsNormBackward(x: x, weight: w, dy: dy, rows: rows, dim: dim, eps: eps)
        check("rmsnorm backward \(rows)x\(dim)", relativeError(try downloadBF16(dx), refDx), 1e-2)
        // accumulate: dx += grad (dx already holds grad): expect 2 * grad (rounded).
        try ctx.rmsNormBackward(x: xd, weight: wd, dy: upload(dyb), into: dx, rows: rows, dim: dim, eps: eps, accumulate: true)
        check("rmsnorm backward accumulate \(rows)x\(dim)", relativeError(try downloadBF16(dx), refDx.map { 2 * $0 }), 1e-2)
    }
}

group("rope") {
    let tokens = 256, heads = 8, headDim = 128
    let (xb, x) = rng.bf16(tokens * heads * headDim)
    let positions = (0..<tokens).map { _ in Int32(rng.int(8192)) }
    let inv = CPUReference.ropeInverseFrequencies(headDim: headDim, theta: 500_000)
    let xd = try upload(xb), pd = try upload(positions), fd = try upload(inv)
    try ctx.rope(xd, positions: pd, inverseFrequencies: fd, tokens: tokens, heads: heads, headDim: headDim)
    let fwd = CPUReference.rope(x: x, positions: positions, inverseFrequencies: inv, tokens: tokens, heads: heads, headDim: headDim)
    let gpuFwd = try downloadBF16(xd)
    check("rope forward \(tokens)x\(heads)x\(headDim)", relativeError(gpuFwd, fwd), 1e-2)
    try ctx.rope(xd, positions: pd, inverseFrequencies: fd, tokens: tokens, heads: heads, headDim: headDim, backward: true)
    let bwd = CPUReference.rope(x: gpuFwd, positions: positions, inverseFrequencies: inv, tokens: tokens, heads: heads,
                                headDim: headDim, backward: true)
    check("rope backward \(tokens)x\(heads)x\(headDim)", relativeError(try downloadBF16(xd), bwd), 1e-2)
}

group("swiglu") {
    for n in [(1 << 20) + 5, 37] {
        let (gb, g) = rng.bf16(n, -6, 6)
        let (ub, u) = rng.bf16(n)
        let (db, d) = rng.bf16(n)
        let gd = try upload(gb), ud = try upload(ub)
        let h = try poisoned(UInt16.self, n)
        try ctx.swigluForward(gate: gd, up: ud, into: h, count: n)
        check("swiglu forward (\(n))", relativeError(try downloadBF16(h), CPUReference.swigluForward(gate: g, up: u)), 1e-2)
        let (refDg, refDu) = CPUReference.swigluBackward(dh: d, gate: g, up: u)
        // In place: dgate over gate, dup over up.
        try ctx.swigluBackward(dh: upload(db), gate: gd, up: ud, dgate: gd, dup: ud, count: n)
        check("swiglu backward dgate, in place (\(n))", relativeError(try downloadBF16(gd), refDg), 1e-2)
        check("swiglu backward dup, in place (\(n))", relativeError(try downloadBF16(ud), refDu), 1e-2)
    }
}

group("embedding") {
    let vocab = 1000, dim = 576, tokens = 300
    let (tb, t) = rng.bf16(vocab * dim)
    var ids = (0..<tokens).map { _ in Int32(rng.int(vocab)) }
    let flag = try upload([Int32(0)])
    let out = try poisoned(UInt16.self, tokens * dim)
    try ctx.embeddingForward(ids: upload(ids), table: upload(tb), into: out, tokens: tokens, vocab: vocab, dim: dim, badIdFlag: flag)
    check("embedding lookup \(tokens) of \(vocab)x\(dim)",
          relativeError(try downloadBF16(out), CPUReference.embedding(ids: ids, table: t, vocab: vocab, dim: dim)), 0)
    checkTrue("embedding: valid ids leave the flag clear", try flag.download()[0] == 0)
    ids[17] = Int32(vocab)  // out of range
    try ctx.embeddingForward(ids: upload(ids), table: upload(tb), into: out, tokens: tokens, vocab: vocab, dim: dim, badIdFlag: flag)
    let gpu = try downloadBF16(out)
    checkTrue("embedding: bad id sets the flag, zero row", try flag.download()[0] == 1 && gpu[(17 * dim)..<(18 * dim)].allSatisfy { $0 == 0 })
}

group("cross entropy") {
    let rows = 16, vocab = 49152 + 7
    let (lb, l) = rng.bf16(rows * vocab, -8, 8)
    var labels = (0..<rows).map { _ in Int32(rng.int(vocab)) }
    labels[3] = -100
    labels[11] = -100
    let counted = labels.filter { $0 != -100 }.count
    let scale = 1 / Float(counted)
    let (refLoss, refGrad) = CPUReference.crossEntropy(logits: l, labels: labels, rows: rows, vocab: vocab, gradScale: scale)
    let ld = try upload(lb), labd = try upload(labels)
    let rowLoss = try poisoned(Float.self, rows)
    let grad = try poisoned(UInt16.self, rows * vocab)
    try ctx.crossEntropy(logits: ld, labels: labd, rows: rows, vocab: vocab, gradScale: scale, rowLoss: rowLoss, dlogits: grad)
    check("cross entropy row losses \(rows)x\(vocab)", relativeError(try rowLoss.download(), refLoss), 1e-4)
    check("cross entropy dlogits \(rows)x\(vocab)", relativeError(try downloadBF16(grad), refGrad), 1e-2)
    let sums = try poisoned(Float.self, 2)
    try ctx.crossEntropyReduce(rowLoss: rowLoss, labels: labd, rows: rows, into: sums)
    let s = try sums.download()
    check("cross entropy loss sum", relativeError([s[0]], [refLoss.reduce(0, +)]), 1e-5)
    checkTrue("cross entropy counts -100 out", s[1] == Float(counted), "count \(s[1]) of \(rows)")
    // In place: the gradient overwrites the logits.
    try ctx.crossEntropy(logits: ld, labels: labd, rows: rows, vocab: vocab, gradScale: scale, rowLoss: rowLoss, dlogits: ld)
    check("cross entropy dlogits in place", relativeError(try downloadBF16(ld), refGrad), 1e-2)
}

group("adamw") {
    let n = (1 << 20) + 3
    var p = rng.floats(n), m = [Float](repeating: 0, count: n), v = m
    let pd = try upload(p), md = try upload(m), vd = try upload(v)
    let config = AdamWConfig(learningRate: 1e-3, weightDecay: 0.01)
    for step in 1...3 {
        let g = rng.floats(n)
        try ctx.adamwStep(params: pd, grads: upload(g), m: md, v: vd, count: n, step: step, config: config)
        CPUReference.adamwStep(params: &p, grads: g, m: &m, v: &v, step: step, learningRate: config.learningRate,
                               beta1: config.beta1, beta2: config.beta2, eps: config.eps, weightDecay: config.weightDecay)
    }
    check("adamw 3 steps: params (\(n))", relativeError(try pd.download(), p), 1e-5)
    check("adamw 3 steps: m", relativeError(try md.download(), m), 1e-5)
    check("adamw 3 steps: v", relativeError(try vd.download(), v), 1e-5)
}

group("gemm") {
    let blas = try ctx.blas()
    print("      cuBLASLt version \(blas.version)")
    let m = 256, n = 384, k = 512
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let (ab, a) = rng.bf16(m * k), (bb, b) = rng.bf16(k * n)
        let ref = CPUReference.matmul(a, b, m: m, n: n, k: k, transA: ta, transB: tb)
        let ad = try upload(ab), bd = try upload(bb)
        let c16 = try poisoned(UInt16.self, m * n)
        try blas.gemm(m: m, n: n, k: k, a: ad.pointer, transA: ta, b: bd.pointer, transB: tb, c: c16.pointer)
        check("gemm \(dt)->\(dt) \(m)x\(n)x\(k) tA=\(ta ? 1 : 0) tB=\(tb ? 1 : 0)", relativeError(try downloadBF16(c16), ref), 1e-2)
        let c32 = try poisoned(Float.self, m * n)
        try blas.gemm(m: m, n: n, k: k, a: ad.pointer, transA: ta, b: bd.pointer, transB: tb, c: c32.pointer, outputType: .float32)
        check("gemm \(dt)->fp32 \(m)x\(n)x\(k) tA=\(ta ? 1 : 0) tB=\(tb ? 1 : 0)", relativeError(try c32.download(), ref), 1e-4)
    }
    // fp32 GEMM with beta = 1 (accumulate), odd sizes.
    let (m2, n2, k2) = (37, 65, 129)
    let a = rng.floats(m2 * k2), b = rng.floats(k2 * n2), c0 = rng.floats(m2 * n2)
    let cd = try upload(c0)
    try blas.gemm(m: m2, n: n2, k: k2, a: upload(a).pointer, b: upload(b).pointer, c: cd.pointer, inputType: .float32,
                  outputType: .float32, alpha: 0.5, beta: 1)
    let ref = zip(CPUReference.matmul(a, b, m: m2, n: n2, k: k2), c0).map { 0.5 * $0 + $1 }
    check("gemm fp32 \(m2)x\(n2)x\(k2), alpha 0.5, beta 1", relativeError(try cd.download(), ref), 1e-5)
    // Strided batch of 3.
    let batch = 3, (m3, n3, k3) = (64, 96, 128)
    let (ab3, a3) = rng.bf16(batch * m3 * k3), (bb3, b3) = rng.bf16(batch * k3 * n3)
    let c3 = try poisoned(Float.self, batch * m3 * n3)
    try blas.gemm(m: m3, n: n3, k: k3, a: upload(ab3).pointer, b: upload(bb3).pointer, transB: false, c: c3.pointer,
                  outputType: .float32, batch: batch, strideA: m3 * k3, strideB: k3 * n3, strideC: m3 * n3)
    var ref3 = [Float]()
    for i in 0..<batch {
        ref3 += CPUReference.matmul(Array(a3[(i * m3 * k3)..<((i + 1) * m3 * k3)]), Array(b3[(i * k3 * n3)..<((i + 1) * k3 * n3)]),
                                    m: m3, n: n3, k: k3)
    }
    check("gemm batched x\(batch) \(dt)->fp32 \(m3)x\(n3)x\(k3)", relativeError(try c3.download(), ref3), 1e-4)
}

group("attention") {
    let shapes: [(AttentionShape, Bool)] = [
        (AttentionShape(batch: 2, seq: 200, heads: 4, kvHeads: 2, headDim: 64), false),
        (AttentionShape(batch: 1, seq: 150, heads: 4, kvHeads: 1, headDim: 128), true),
        // Several 128-row tiles: interior (unmasked) tiles, a partial last tile, GQA groups of 4; D 32 packed.
        (AttentionShape(batch: 1, seq: 600, heads: 8, kvHeads: 2, headDim: 128), false),
        (AttentionShape(batch: 2, seq: 300, heads: 2, kvHeads: 2, headDim: 32), true),
    ]
    for (shape, packed) in shapes {
        let qn = shape.tokens * shape.heads * shape.headDim, kn = shape.tokens * shape.kvHeads * shape.headDim
        let (qb, q) = rng.bf16(qn, -2, 2), (kb, k) = rng.bf16(kn, -2, 2), (vb, v) = rng.bf16(kn), (db, dout) = rng.bf16(qn)
        // Two packed sequences in one row: positions 0..<77 and 77..<seq.
        let segments: [Int32]? = packed ? (0..<shape.tokens).map { $0 % shape.seq < 77 ? 0 : 1 } : nil
        let ref = CPUReference.attentionForward(q: q, k: k, v: v, segments: segments, batch: shape.batch, seq: shape.seq,
                                                heads: shape.heads, kvHeads: shape.kvHeads, headDim: shape.headDim)
        let grads = CPUReference.attentionBackward(q: q, k: k, v: v, dout: dout, segments: segments, batch: shape.batch,
                                                   seq: shape.seq, heads: shape.heads, kvHeads: shape.kvHeads, headDim: shape.headDim)
        let qd = try upload(qb), kd = try upload(kb), vd = try upload(vb), dd = try upload(db)
        let segd = try segments.map { try upload($0) }
        // Tensor-core flash kernels (the default), the 64-row tensor-core kernels, the fp32 kernels.
        for (tensorCores, flash) in [(true, true), (true, false), (false, false)] {
            // Where the card's shared memory cannot hold the flash kernels (99 KB cards, d128), the launcher runs the
            // 64-row ones; the name says which ran.
            let kind = tensorCores ? (flash ? (ctx.flashAttentionFits(headDim: shape.headDim) ? " flash" : " flash->mma") : " mma") : ""
            let name = "attention\(kind) b\(shape.batch) s\(shape.seq) h\(shape.heads)/\(shape.kvHeads) d\(shape.headDim)\(packed ? " packed" : "")"
            let o = try poisoned(UInt16.self, qn), lse = try poisoned(Float.self, shape.tokens * shape.heads)
            try ctx.attentionForward(q: qd, k: kd, v: vd, into: o, lse: lse, segments: segd, shape: shape, tensorCores: tensorCores,
                                     flash: flash)
            check("\(name): o", relativeError(try downloadBF16(o), ref.o), 1e-2)
            check("\(name): lse", relativeError(try lse.download(), ref.lse), 1e-4)
            let dq = try poisoned(UInt16.self, qn), dk = try poisoned(UInt16.self, kn), dv = try poisoned(UInt16.self, kn)
            try ctx.attentionBackward(q: qd, k: kd, v: vd, o: o, dout: dd, lse: lse, segments: segd, dq: dq, dk: dk, dv: dv,
                                      shape: shape, tensorCores: tensorCores, flash: flash)
            check("\(name): dq", relativeError(try downloadBF16(dq), grads.dq), 2e-2)
            check("\(name): dk", relativeError(try downloadBF16(dk), grads.dk), 2e-2)
            check("\(name): dv", relativeError(try downloadBF16(dv), grads.dv), 2e-2)
        }
    }
}

group("attention variations") { try checkAttentionVariations() }  // AttentionFamilyChecks.swift
group("attention d256") { try checkAttentionWide() }  // AttentionFamilyChecks.swift
group("attention wgmma") {  // AttentionWGMMAChecks.swift: checks, then (unless --no-bench) the 8B-shape timings
    try checkAttentionWGMMA()
    if runBench { try timeAttentionWGMMA() }
}

group("lora linear") {
    let (tokens, inF, outF, r) = (300, 576, 1536, 16)
    let scale: Float = 32 / Float(r)
    let (xb, x) = rng.bf16(tokens * inF), (wb, w) = rng.bf16(outF * inF, -0.05, 0.05)
    let bound = 1 / Float(inF).squareRoot()
    let aMaster = rng.floats(r * inF, -bound, bound), bMaster = rng.floats(outF * r, -0.05, 0.05)
    let a = aMaster.map(dt.round), b = bMaster.map(dt.round)
    let (dyb, dy) = rng.bf16(tokens * outF)
    // fp32 master weights -> bf16 copies on the device.
    let aBF = try poisoned(UInt16.self, r * inF), bBF = try poisoned(UInt16.self, outF * r)
    try ctx.convertToBF16(upload(aMaster), into: aBF, count: r * inF)
    try ctx.convertToBF16(upload(bMaster), into: bBF, count: outF * r)
    check("convert fp32 -> bf16 (\(r * inF))", relativeError(try downloadBF16(aBF), a), 0)
    let back = try poisoned(Float.self, outF * r)
    try ctx.convertToFloat(bBF, into: back, count: outF * r)
    check("convert bf16 -> fp32 (\(outF * r))", relativeError(try back.download(), b), 0)

    let lora = LoRADeviceWeights(a: aBF, b: bBF, rank: r, scale: scale)
    let xd = try upload(xb), wd = try upload(wb)
    let xa = try poisoned(UInt16.self, tokens * r), y = try poisoned(UInt16.self, tokens * outF)
    try ctx.loraLinearForward(x: xd, weight: wd, lora: lora, tokens: tokens, inFeatures: inF, outFeatures: outF, xa: xa, into: y)
    let refY = CPUReference.loraLinearForward(x: x, weight: w, a: a, b: b, scale: scale, tokens: tokens, inFeatures: inF,
                                              outFeatures: outF, rank: r)
    check("lora linear forward \(tokens)x\(inF)->\(outF) r\(r)", relativeError(try downloadBF16(y), refY), 1e-2)
    let ref = CPUReference.loraLinearBackward(x: x, weight: w, a: a, b: b, scale: scale, dy: dy, tokens: tokens,
                                              inFeatures: inF, outFeatures: outF, rank: r)
    let dyB = try poisoned(UInt16.self, tokens * r), dx = try poisoned(UInt16.self, tokens * inF)
    let dA = try poisoned(Float.self, r * inF), dB = try poisoned(Float.self, outF * r)
    try ctx.loraLinearBackward(x: xd, weight: wd, lora: lora, xa: xa, dy: upload(dyb), tokens: tokens, inFeatures: inF,
                               outFeatures: outF, dyB: dyB, dx: dx, dA: dA, dB: dB)
    check("lora linear backward dx", relativeError(try downloadBF16(dx), ref.dx), 1e-2)
    check("lora linear backward dA (fp32)", relativeError(try dA.download(), ref.dA), 1e-2)
    check("lora linear backward dB (fp32)", relativeError(try dB.download(), ref.dB), 1e-2)
    // Gradient accumulation: a second backward adds.
    try ctx.loraLinearBackward(x: xd, weight: wd, lora: lora, xa: xa, dy: upload(dyb), tokens: tokens, inFeatures: inF,
                               outFeatures: outF, dyB: dyB, dx: dx, dA: dA, dB: dB, accumulateGradients: true)
    check("lora linear backward accumulates dA", relativeError(try dA.download(), ref.dA.map { 2 * $0 }), 1e-2)
}

// Generation and the GPU optimizers (InferenceChecks.swift).
group("decode gemv") {
    try checkDecodeGemv()
    try checkDecodeGemvMMA()
    try checkLoRAARows()
}
group("inference fixture") { try checkInferenceFixture() }
group("inference random") { try checkInferenceRandom() }
group("dropout mask") { try checkDropoutKernels() }  // ParityChecks.swift
group("lora dropout fused") { try checkFusedDropoutKernels() }  // DropoutChecks.swift
group("adamw8bit") { try checkAdamW8bit() }
group("batched kernels") { try checkBatchedKernels() }  // BatchedChecks.swift
group("ring kv kernels") { try checkRingKernels() }  // BatchedChecks.swift
group("batched generation") { try checkBatchedGeneration() }
runFamilyInferenceChecks()  // FamilyInferenceChecks.swift: "family generation: ..." groups
runMergeChecks(ctx)  // MergeChecks.swift

group("allocator") {
    let before = A.driverAllocations
    do { _ = try A.buffer(Float.self, count: 12345) }
    do { _ = try A.buffer(Float.self, count: 12300) }  // same size class: reused
    checkTrue("allocator reuses freed blocks", A.driverAllocations <= before + 1,
              "\(A.driverAllocations - before) driver allocation(s) for 2 requests; in use \(A.currentBytes) B, peak \(A.peakBytes) B")
}

runTrainingChecks(ctx)  // TrainingChecks.swift
runMemoryChecks(ctx)  // MemoryChecks.swift: checkpoint offloading, host embedding, peaks
runParityTrainingChecks()  // ParityChecks.swift: dropout, per-projection ranks
runQwen2Checks()  // ParityChecks.swift: linear biases in training and generation
runFamilyOpChecks()  // FamilyOpChecks.swift: the element-wise ops of Qwen3, Gemma 2/3 and Phi-3
runFamilyTrainingChecks()  // FamilyTrainingChecks.swift: every family's variations in the GPU trainer
runFoldChecks()  // FoldChecks.swift: the folded LoRA's strided kernels, and the folded trainer against the unfolded one
runOptimizerChecks()  // OptimizerChecks.swift: the paged optimizers' streamed state against the state on the device
runNCCLChecks(ctx)  // NCCLChecks.swift: NCCL in a world of one, the Trainer's data-parallel path
runVocabularyParallelChecks(ctx)  // VocabularyParallelChecks.swift: the head by vocabulary (kernels; the Trainer through NCCL)

// MARK: - Microbenchmarks

/// Median milliseconds of `body` over `iterations` runs after `warmup` runs, timed with events.
func timeMedian(_ iterations: Int = 20, warmup: Int = 3, _ body: () throws -> Void) throws -> Double {
    let start = try CUDAEvent(device: dev), end = try CUDAEvent(device: dev)
    for _ in 0..<warmup { try body() }
    var times = [Double]()
    for _ in 0..<iterations {
        try start.record(on: dev.stream)
        try body()
        try end.record(on: dev.stream)
        try end.synchronize()
        times.append(try end.milliseconds(since: start))
    }
    return times.sorted()[times.count / 2]
}

if runBench {
    group("benchmarks") {
        print("bench (median of 20, CUDA events):")
        // Copy bandwidth: 1 GiB device-to-device, counting bytes read + written.
        let bytes = 1 << 30
        let src = try A.buffer(UInt8.self, count: bytes), dst = try A.buffer(UInt8.self, count: bytes)
        try src.fill(byte: 0x5A)
        let copyMs = try timeMedian { try dev.copy(deviceTo: dst.pointer, from: src.pointer, bytes: bytes) }
        let bandwidth = 2 * Double(bytes) / (copyMs / 1000) / 1e9
        print("  copy 1 GiB device->device: \(fmt(copyMs, 3)) ms = \(fmt(bandwidth, 0)) GB/s (read + write)")

        // bf16 GEMM 8192^3 on random data.
        let blas = try ctx.blas()
        let s = 8192
        let a = try A.buffer(UInt16.self, count: s * s), b = try A.buffer(UInt16.self, count: s * s)
        let c = try A.buffer(UInt16.self, count: s * s)
        var r = SeededGenerator(seed: seed ^ 0xabcdef)
        let host = (0..<(s * s)).map { _ in dt.encode(r.uniform(-1, 1)) }
        try a.upload(host)
        try b.upload(host.reversed())
        for (ta, tb) in [(false, true), (false, false), (true, false)] {
            let ms = try timeMedian { try blas.gemm(m: s, n: s, k: s, a: a.pointer, transA: ta, b: b.pointer, transB: tb, c: c.pointer) }
            print("  gemm \(dt) \(s)^3 tA=\(ta ? 1 : 0) tB=\(tb ? 1 : 0): \(fmt(ms, 3)) ms = \(fmt(2 * Double(s * s) * Double(s) / (ms / 1000) / 1e12, 1)) TFLOP/s")
        }

        // Memory-bound kernels at Llama-3.1-8B sizes: achieved GB/s against the copy bandwidth.
        func report(_ name: String, _ ms: Double, _ movedBytes: Double) {
            print("  \(pad(name, 50)) \(pad(fmt(ms, 3) + " ms", 12)) \(fmt(movedBytes / (ms / 1000) / 1e9, 0)) GB/s")
        }
        let out = 4096, inp = 14336, count = out * inp
        let packed = try A.buffer(UInt8.self, count: count / 2), q = try A.buffer(UInt8.self, count: count / 64)
        let code = try upload((0..<256).map { Float($0 - 128) / 128 }), nested = try upload([Float](repeating: 0.02, count: count / 64 / 256 + 1))
        try packed.fill(byte: 0x3C)
        try q.fill(byte: 0x91)
        let w = try A.buffer(UInt16.self, count: count)
        let nf4Ms = try timeMedian {
            try ctx.nf4Dequantize(packed: packed, scales: .doubleQuant(quantized: q, code: code, nestedAbsmax: nested, offset: 0.01,
                                                                     nestedBlocksize: 256), count: count, into: w)
        }
        report("nf4 dequantize 4096x14336 -> bf16", nf4Ms, Double(count) / 2 + Double(count) * 2 + Double(count) / 64)
        try timeNF4Dequantize()  // NF4Checks.swift: tiles vs the old kernel at each 8B shape
        let tokens = 8192, hidden = 4096
        let x = try A.buffer(UInt16.self, count: tokens * hidden), y = try A.buffer(UInt16.self, count: tokens * hidden)
        try x.upload(Array(host[0..<(tokens * hidden)]))
        let nw = try upload(Array(host[0..<hidden]))
        report("rmsnorm forward 8192x4096", try timeMedian { try ctx.rmsNormForward(x: x, weight: nw, into: y, rows: tokens, dim: hidden, eps: 1e-5) },
               Double(tokens * hidden) * 4)
        report("rmsnorm backward 8192x4096", try timeMedian { try ctx.rmsNormBackward(x: x, weight: nw, dy: x, into: y, rows: tokens, dim: hidden, eps: 1e-5) },
               Double(tokens * hidden) * 6)
        let ffn = 4096 * 3584  // 4096 tokens x 14336 / 4 ... keep the buffers within the 8192^2 ones
        report("swiglu forward 4096x3584", try timeMedian { try ctx.swigluForward(gate: a, up: b, into: c, count: ffn) }, Double(ffn) * 6)
        report("swiglu backward 4096x3584", try timeMedian { try ctx.swigluBackward(dh: a, gate: b, up: c, dgate: b, dup: c, count: ffn) }, Double(ffn) * 10)
        let ropeTokens = 8192, heads = 32
        let pos = try upload((0..<ropeTokens).map { Int32($0 % 2048) })
        let inv = try upload(CPUReference.ropeInverseFrequencies(headDim: 128, theta: 500_000))
        report("rope 8192x32x128", try timeMedian { try ctx.rope(x, positions: pos, inverseFrequencies: inv, tokens: ropeTokens, heads: heads, headDim: 128) },
               Double(ropeTokens * heads * 128) * 4)
        let ceRows = 256, vocab = 128_256
        let labels = try upload((0..<ceRows).map { Int32($0 * 7) })
        let rowLoss = try A.buffer(Float.self, count: ceRows)
        report("cross entropy fwd+bwd 256x128256", try timeMedian {
            try ctx.crossEntropy(logits: a, labels: labels, rows: ceRows, vocab: vocab, gradScale: 1e-3, rowLoss: rowLoss, dlogits: b)
        }, Double(ceRows * vocab) * 6)
        let n = 40_000_000  // LoRA r=16 on all projections of an 8B model
        let p = try A.buffer(Float.self, count: n), g = try A.buffer(Float.self, count: n)
        let m1 = try A.buffer(Float.self, count: n), v1 = try A.buffer(Float.self, count: n)
        for buf in [p, g, m1, v1] { try buf.fill(byte: 0) }
        var step = 0
        report("adamw 40M fp32", try timeMedian {
            step += 1
            try ctx.adamwStep(params: p, grads: g, m: m1, v: v1, count: n, step: step, config: AdamWConfig(learningRate: 1e-4))
        }, Double(n) * 28)
        // Attention at the Llama-3.1-8B shape, batch 2 x 2048: causal FLOPs = 4 B H S^2 D / 2 forward, 2.5x that backward.
        let shape = AttentionShape(batch: 2, seq: 2048, heads: 32, kvHeads: 8, headDim: 128)
        let qn = shape.tokens * shape.heads * shape.headDim, kn = shape.tokens * shape.kvHeads * shape.headDim
        let aq = try A.buffer(UInt16.self, count: qn), ak = try A.buffer(UInt16.self, count: kn), av = try A.buffer(UInt16.self, count: kn)
        try aq.upload(Array(host[0..<qn]))
        try ak.upload(Array(host[qn..<(qn + kn)]))
        try av.upload(Array(host[(qn + kn)..<(qn + 2 * kn)]))
        let ao = try A.buffer(UInt16.self, count: qn), alse = try A.buffer(Float.self, count: shape.tokens * shape.heads)
        let adq = try A.buffer(UInt16.self, count: qn), adk = try A.buffer(UInt16.self, count: kn), adv = try A.buffer(UInt16.self, count: kn)
        let flops = 4 * Double(shape.batch * shape.heads) * Double(shape.seq * shape.seq) * Double(shape.headDim) / 2
        let delta = try A.buffer(Float.self, count: shape.tokens * shape.heads), accumulator = try A.buffer(Float.self, count: qn)
        for flash in [true, false] {
            let kind = flash ? (ctx.flashAttentionFits(headDim: shape.headDim) ? "flash" : "flash->mma 64-row") : "mma 64-row"
            let fwdMs = try timeMedian(5, warmup: 1) {
                try ctx.attentionForward(q: aq, k: ak, v: av, into: ao, lse: alse, shape: shape, flash: flash)
            }
            print("  attention forward b2 s2048 h32/8 d128 (\(kind)): \(fmt(fwdMs, 3)) ms = \(fmt(flops / (fwdMs / 1000) / 1e12, 1)) TFLOP/s")
            let bwdMs = try timeMedian(5, warmup: 1) {
                try ctx.attentionBackward(q: aq, k: ak, v: av, o: ao, dout: ao, lse: alse, dq: adq, dk: adk, dv: adv, delta: delta,
                                          dqAccumulator: accumulator, shape: shape, flash: flash)
            }
            print("  attention backward b2 s2048 h32/8 d128 (\(kind)): \(fmt(bwdMs, 3)) ms = \(fmt(2.5 * flops / (bwdMs / 1000) / 1e12, 1)) TFLOP/s")
        }
        try timeAttentionVariations()  // AttentionFamilyChecks.swift: d96, d256, soft-capping, a window
        try timeAttentionGemma2()  // AttentionFamilyChecks.swift: d256 at the Gemma-2-9B shape, flash and 64-row
        try timeDecodeGemvs()  // InferenceChecks.swift: the NF4 GEMV kernels at the 8B layer shapes
        // QLoRA linear at the Llama-3.1-8B MLP up-projection: 4096 tokens, 4096 -> 14336, r 16; NF4 weight
        // dequantized into a bf16 scratch buffer each call, then the LoRA linear GEMMs.
        do {
            let (tokens, inF, outF, r) = (4096, 4096, 14336, 16)
            let count = inF * outF
            let x = try A.buffer(UInt16.self, count: tokens * inF), dy = try A.buffer(UInt16.self, count: tokens * outF)
            try x.upload(Array(host[0..<(tokens * inF)]))
            try dy.upload(Array(host[0..<(tokens * outF)]))
            let la = try A.buffer(UInt16.self, count: r * inF), lb = try A.buffer(UInt16.self, count: outF * r)
            try la.upload(Array(host[0..<(r * inF)]))
            try lb.upload(Array(host[0..<(outF * r)]))
            let lora = LoRADeviceWeights(a: la, b: lb, rank: r, scale: 2)
            let xa = try A.buffer(UInt16.self, count: tokens * r), y = try A.buffer(UInt16.self, count: tokens * outF)
            let dyB = try A.buffer(UInt16.self, count: tokens * r), dx = try A.buffer(UInt16.self, count: tokens * inF)
            let dA = try A.buffer(Float.self, count: r * inF), dB = try A.buffer(Float.self, count: outF * r)
            let scales = NF4Scales.doubleQuant(quantized: q, code: code, nestedAbsmax: nested, offset: 0.01, nestedBlocksize: 256)
            let fwdMs = try timeMedian(10, warmup: 2) {
                try ctx.nf4Dequantize(packed: packed, scales: scales, count: count, into: w)
                try ctx.loraLinearForward(x: x, weight: w, lora: lora, tokens: tokens, inFeatures: inF, outFeatures: outF, xa: xa, into: y)
            }
            let bwdMs = try timeMedian(10, warmup: 2) {
                try ctx.nf4Dequantize(packed: packed, scales: scales, count: count, into: w)
                try ctx.loraLinearBackward(x: x, weight: w, lora: lora, xa: xa, dy: dy, tokens: tokens, inFeatures: inF,
                                           outFeatures: outF, dyB: dyB, dx: dx, dA: dA, dB: dB)
            }
            let baseFlops = 2 * Double(tokens) * Double(inF) * Double(outF)
            print("  qlora linear fwd (nf4 dequant + 3 GEMMs) 4096 tok 4096->14336 r16: \(fmt(fwdMs, 3)) ms = \(fmt(baseFlops / (fwdMs / 1000) / 1e12, 1)) useful TFLOP/s")
            print("  qlora linear bwd (nf4 dequant + 5 GEMMs, dx + dA + dB):          \(fmt(bwdMs, 3)) ms = \(fmt(baseFlops / (bwdMs / 1000) / 1e12, 1)) useful TFLOP/s")
        }
        try timeLoRADropout(host)  // DropoutChecks.swift
        try timeBatchedGeneration()  // BatchedChecks.swift
        try timeFamilyOps()  // FamilyOpChecks.swift
        let (free, total) = try dev.memoryInfo()
        print("  allocator: in use \(fmt(Double(A.currentBytes) / Double(1 << 30))) GiB, peak \(fmt(Double(A.peakBytes) / Double(1 << 30))) GiB, "
              + "reserved peak \(fmt(Double(A.peakReservedBytes) / Double(1 << 30))) GiB; driver: \(fmt(Double(free) / Double(1 << 30))) of \(fmt(Double(total) / Double(1 << 30))) GiB free")
    }
}

print("\(passed) passed, \(failed) failed")
exit(failed > 0 ? 1 : 0)
