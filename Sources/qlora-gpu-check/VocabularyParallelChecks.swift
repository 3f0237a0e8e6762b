// The vocabulary-parallel head on the GPU (Model/CUDADecoderTrainer+VocabularyParallelHead.swift, Kernels/cross_entropy.cu's
// second part).
// Kernels against their CPU twins (CPUReference.crossEntropySliceStatistics, crossEntropyCombine, crossEntropySliceGradient)
// on random bf16 logits cut into the slices of 1–4 ranks (uneven slices, widths that are not multiples of 8 nor of the
// block's 4096 values, a rank without rows when V < W, rows whose target another slice holds, ignored rows), with and
// without soft-capping; each kernel is fed the GPU's own output of the step before, so each is checked alone. A world of
// one's slice (the whole vocabulary) through statistics, combination and gradient = cross_entropy_forward_backward's row
// losses and d logits bit for bit. The trainer's arithmetic over 1–3 ranks emulated on one GPU with its GEMMs (each
// slice of the head, the fp32 partial products summed over the ranks in rank order, rounded once) = the whole head's
// loss and d(normed); at W = 1 it also says whether the fp32-output GEMM rounded to bf16 is the bf16 GEMM's bits.
// NCCL in a world of one: the Trainer with the head sharded by vocabulary = the plain path bit for bit (losses, gradient
// norms, eval loss, adapter bytes, under full determinism); the same with d(normed) reduced in fp32 through ncclReduce
// (the path of several ranks) within float rounding, saying whether its bits are the plain path's (whether cuBLASLt's
// fp32-output GEMM rounded to bf16 gives the bf16-output GEMM's bits); and the sharded head's peak memory against its plan.

import QLoRA
#if canImport(Glibc)
import Glibc
#endif

func runVocabularyParallelChecks(_ ctx: CUDAContext) {
    group("cross entropy: vocabulary slices") {
        for (vocab, worlds) in [(9_001, [1, 2, 3, 4]), (8_192, [1, 2]), (3, [4])] {
            for softcap: Float? in [nil, 30] {
                let rows = 11
                let (bits, values) = rng.bf16(rows * vocab, -40, 40)
                var labels = (0..<rows).map { _ in Int32(rng.int(vocab)) }
                labels[4] = -100
                labels[9] = -100
                let counted = labels.filter { $0 != -100 }.count
                let scale = 1 / Float(counted)
                let labelBuffer = try upload(labels)
                for world in worlds {
                    let name = "vocabulary slices V \(vocab) over \(world)\(softcap.map { ", softcap \(Int($0))" } ?? "")"
                    let slices = (0..<world).map { VocabularyParallelLoss.slice(vocab: vocab, rank: $0, worldSize: world) }
                    func sliceBits(_ s: Range<Int>) -> [UInt16] { (0..<rows).flatMap { r in s.map { bits[r * vocab + $0] } } }
                    func sliceValues(_ s: Range<Int>) -> [Float] { (0..<rows).flatMap { r in s.map { values[r * vocab + $0] } } }
                    // Statistics of each slice, as rank q would write them into its part [q][rows][3].
                    let statistics = try poisoned(Float.self, 3 * world * rows)
                    var referenceStatistics: [Float] = []
                    var gpuStatistics: [Float] = []
                    for (q, s) in slices.enumerated() {
                        let logits = try upload(s.isEmpty ? [0] : sliceBits(s))
                        try ctx.crossEntropySliceStatistics(logits: logits.pointer, labels: labelBuffer.pointer, rows: rows, width: s.count,
                                                            columnStart: s.lowerBound, softcap: softcap,
                                                            statistics: statistics.address(at: 3 * q * rows))
                        referenceStatistics += CPUReference.crossEntropySliceStatistics(logits: sliceValues(s), labels: labels, rows: rows,
                                                                                        width: s.count, columnStart: s.lowerBound, softcap: softcap)
                    }
                    gpuStatistics = try statistics.download()
                    let maxima = stride(from: 0, to: gpuStatistics.count, by: 3).map { gpuStatistics[$0] }
                    let referenceMaxima = stride(from: 0, to: referenceStatistics.count, by: 3).map { referenceStatistics[$0] }
                    checkTrue(name + ": slice maxima", zip(maxima, referenceMaxima).allSatisfy { $0 == $1 || abs($0 - $1) <= 1e-5 * abs($1) },
                              "first \(maxima.first ?? 0) vs \(referenceMaxima.first ?? 0)")
                    check(name + ": slice sums", relativeError(stride(from: 1, to: gpuStatistics.count, by: 3).map { gpuStatistics[$0] },
                                                                stride(from: 1, to: referenceStatistics.count, by: 3).map { referenceStatistics[$0] }), 1e-4)
                    check(name + ": slice target logits (0 where another slice has it)",
                          relativeError(stride(from: 2, to: gpuStatistics.count, by: 3).map { gpuStatistics[$0] },
                                        stride(from: 2, to: referenceStatistics.count, by: 3).map { referenceStatistics[$0] }), 1e-5)
                    // The combination of the GPU's statistics, all rows' lse and the row losses of rows 2..<8 (one rank's tokens).
                    let lse = try poisoned(Float.self, rows), rowLoss = try poisoned(Float.self, 6)
                    try ctx.crossEntropyCombine(statistics: statistics.pointer, labels: labelBuffer.pointer, rows: rows, worldSize: world, vocab: vocab,
                                                lse: lse.pointer, rowLoss: rowLoss.pointer, lossRows: 2..<8)
                    let (refLSE, refLoss) = CPUReference.crossEntropyCombine(statistics: gpuStatistics, labels: labels, rows: rows, worldSize: world,
                                                                             vocab: vocab, lossRows: 2..<8)
                    let gpuLSE = try lse.download()
                    check(name + ": combined lse", relativeError(labels.indices.filter { labels[$0] != -100 }.map { gpuLSE[$0] },
                                                                 labels.indices.filter { labels[$0] != -100 }.map { refLSE[$0] }), 1e-6)
                    check(name + ": row losses of one rank's rows", relativeError(try rowLoss.download(), refLoss), 1e-5)
                    // Each slice's gradient given the GPU's lse, in place.
                    for s in slices where !s.isEmpty {
                        let logits = try upload(sliceBits(s))
                        try ctx.crossEntropySliceGradient(logits: logits.pointer, labels: labelBuffer.pointer, lse: lse.pointer, rows: rows, width: s.count,
                                                          columnStart: s.lowerBound, gradScale: scale, softcap: softcap)
                        let reference = CPUReference.crossEntropySliceGradient(logits: sliceValues(s), labels: labels, lse: gpuLSE, rows: rows,
                                                                               width: s.count, columnStart: s.lowerBound, gradScale: scale, softcap: softcap)
                        check(name + ": d logits of columns \(s.lowerBound)..<\(s.upperBound)", relativeError(try downloadBF16(logits), reference), 1e-2)
                    }
                    guard world == 1 else { continue }
                    // A world of one = the whole-vocabulary kernel, bit for bit.
                    let whole = try upload(bits), plainLoss = try poisoned(Float.self, rows)
                    try ctx.crossEntropy(logits: whole, labels: labelBuffer, rows: rows, vocab: vocab, gradScale: scale, rowLoss: plainLoss,
                                         dlogits: whole, softcap: softcap)
                    let allLoss = try poisoned(Float.self, rows)
                    try ctx.crossEntropyCombine(statistics: statistics.pointer, labels: labelBuffer.pointer, rows: rows, worldSize: 1, vocab: vocab,
                                                lse: lse.pointer, rowLoss: allLoss.pointer, lossRows: 0..<rows)
                    let sliced = try upload(bits)
                    try ctx.crossEntropySliceGradient(logits: sliced.pointer, labels: labelBuffer.pointer, lse: lse.pointer, rows: rows, width: vocab,
                                                      columnStart: 0, gradScale: scale, softcap: softcap)
                    checkTrue(name + ": row losses = the whole kernel's bit for bit",
                              try allLoss.download().map(\.bitPattern) == plainLoss.download().map(\.bitPattern))
                    let (a, b) = (try sliced.download(), try whole.download())
                    checkTrue(name + ": d logits = the whole kernel's bit for bit", a == b, "\(zip(a, b).filter { $0 != $1 }.count) values differ")
                }
            }
        }
    }

    // The trainer's loss arithmetic over W ranks, emulated on one GPU with its GEMMs and kernels: each rank's slice of
    // the head, its logits of every row, statistics, the rank-order combination, its slice's d logits and the fp32
    // partial product d logits·slice, the partials summed over the ranks in rank order and rounded once = the whole
    // head's loss and d(normed) (the plain path's GEMMs and kernel) within float rounding; in a world of one, whether
    // the fp32-output GEMM rounded to bf16 is the bf16-output GEMM's bits (the trainer keeps the bf16 output there).
    group("cross entropy: vocabulary slices through the head's GEMMs, ranks emulated") {
        let rows = 300, hidden = 256, vocab = 5_003
        let blas = try ctx.blas()
        let (xBits, _) = rng.bf16(rows * hidden, -2, 2)
        let (headBits, _) = rng.bf16(vocab * hidden, -0.5, 0.5)
        var labels = (0..<rows).map { _ in Int32(rng.int(vocab)) }
        for r in stride(from: 5, to: rows, by: 17) { labels[r] = -100 }
        let scale = 1 / Float(labels.filter { $0 != -100 }.count)
        let x = try upload(xBits), head = try upload(headBits), labelBuffer = try upload(labels)
        for softcap: Float? in [nil, 30] {
            // The plain path: logits, the whole-vocabulary kernel in place, d(normed) in bf16.
            let logits = try A.buffer(UInt16.self, count: rows * vocab)
            let plainLoss = try poisoned(Float.self, rows), plainHidden = try poisoned(UInt16.self, rows * hidden)
            try blas.gemm(m: rows, n: vocab, k: hidden, a: x.pointer, b: head.pointer, transB: true, c: logits.pointer)
            try ctx.crossEntropy(logits: logits, labels: labelBuffer, rows: rows, vocab: vocab, gradScale: scale, rowLoss: plainLoss,
                                 dlogits: logits, softcap: softcap)
            try blas.gemm(m: rows, n: hidden, k: vocab, a: logits.pointer, b: head.pointer, c: plainHidden.pointer)
            let referenceLoss = try plainLoss.download(), referenceHidden = try downloadBF16(plainHidden)
            for world in [1, 2, 3] {
                let name = "head GEMMs over \(world) emulated ranks\(softcap.map { ", softcap \(Int($0))" } ?? "")"
                let slices = (0..<world).map { VocabularyParallelLoss.slice(vocab: vocab, rank: $0, worldSize: world) }
                let statistics = try poisoned(Float.self, 3 * world * rows)
                for (q, s) in slices.enumerated() {
                    try blas.gemm(m: rows, n: s.count, k: hidden, a: x.pointer, b: head.address(at: s.lowerBound * hidden), transB: true,
                                  c: logits.pointer)
                    try ctx.crossEntropySliceStatistics(logits: logits.pointer, labels: labelBuffer.pointer, rows: rows, width: s.count,
                                                        columnStart: s.lowerBound, softcap: softcap, statistics: statistics.address(at: 3 * q * rows))
                }
                let lse = try poisoned(Float.self, rows), rowLoss = try poisoned(Float.self, rows)
                try ctx.crossEntropyCombine(statistics: statistics.pointer, labels: labelBuffer.pointer, rows: rows, worldSize: world, vocab: vocab,
                                            lse: lse.pointer, rowLoss: rowLoss.pointer, lossRows: 0..<rows)
                let losses = try rowLoss.download()
                if world == 1 {
                    checkTrue(name + ": row losses = the plain path's bit for bit", losses.map(\.bitPattern) == referenceLoss.map(\.bitPattern))
                } else {
                    check(name + ": row losses", relativeError(losses, referenceLoss), 1e-5)
                }
                var summed = [Float](repeating: 0, count: rows * hidden)
                let partial = try poisoned(Float.self, rows * hidden)
                for s in slices {
                    try blas.gemm(m: rows, n: s.count, k: hidden, a: x.pointer, b: head.address(at: s.lowerBound * hidden), transB: true,
                                  c: logits.pointer)
                    try ctx.crossEntropySliceGradient(logits: logits.pointer, labels: labelBuffer.pointer, lse: lse.pointer, rows: rows, width: s.count,
                                                      columnStart: s.lowerBound, gradScale: scale, softcap: softcap)
                    try blas.gemm(m: rows, n: hidden, k: s.count, a: logits.pointer, b: head.address(at: s.lowerBound * hidden),
                                  c: partial.pointer, outputType: .float32)
                    let values = try partial.download()
                    for i in summed.indices { summed[i] += values[i] }
                }
                let rounded = summed.map { dt.decode(dt.encode($0)) }
                if world == 1 {
                    let plainBits = try plainHidden.download(), floatBits = summed.map { dt.encode($0) }
                    let differing = zip(plainBits, floatBits).filter { $0 != $1 }.count
                    // Informational: the trainer keeps the bf16-output GEMM at W = 1 whatever this says.
                    checkTrue(name + ": fp32 GEMM rounded once ≈ the bf16 GEMM", relativeError(rounded, referenceHidden) <= 1e-2,
                              differing == 0 ? "bit for bit" : "\(differing) of \(plainBits.count) values differ in their bits")
                } else {
                    check(name + ": d(normed), the ranks' fp32 partials summed then rounded", relativeError(rounded, referenceHidden), 1e-2)
                }
            }
        }
    }

    group("nccl: Trainer with the vocabulary-parallel head (world of one) = plain path") {
        let directory = fixtureDirectory()
        let train = randomExamples(count: 8, length: 48, vocab: 1000, seed: 7)
        let eval = randomExamples(count: 3, length: 40, vocab: 1000, seed: 8)
        let nccl = try NCCLLibrary()
        struct Run { var history: [StepRecord]; var evalLoss: Double; var adapter: [UInt8]; var columns: Range<Int>? }
        func run(_ name: String, sharded: Bool, floatReduction: Bool = false) throws -> Run {
            let output = "/tmp/qlora-gpu-check-head-\(name)-\(getpid())"
            let collective: Collective = sharded
                ? try NCCLCollective(nccl: nccl, context: ctx, rank: 0, worldSize: 1, uniqueID: try nccl.uniqueID())
                : LocalCollective()
            let trainer = try fixtureTrainer(directory, optimizer: "paged_adamw_8bit", device: .cuda(ctx), output: output, train: train, eval: eval,
                                             dropout: 0.05, fullDeterminism: true, collective: collective, shardHead: sharded ? true : nil)
            let engine = trainer.engine as? CUDATrainingEngine
            if floatReduction { engine?.trainer.reducesHeadGradientInFloat = true }
            let summary = try trainer.run()
            return Run(history: trainer.history, evalLoss: summary.bestEvalLoss ?? .nan,
                       adapter: try FileSystem.readFile(output + "/adapter_model.safetensors"), columns: engine?.trainer.headColumns)
        }
        let plain = try run("plain", sharded: false)
        let sharded = try run("sharded", sharded: true)
        checkTrue("vocabulary-parallel head: the engine shards it (rank 0 holds every row; plain path: whole)",
                  plain.columns == nil && sharded.columns?.lowerBound == 0 && (sharded.columns?.count ?? 0) > 0,
                  "rows \(sharded.columns.map { "\($0)" } ?? "none")")
        let differing = zip(plain.history, sharded.history).filter {
            $0.loss.bitPattern != $1.loss.bitPattern || $0.gradientNorm.bitPattern != $1.gradientNorm.bitPattern
        }
        checkTrue("vocabulary-parallel head: the plain path's step losses and gradient norms", differing.isEmpty && sharded.history.count == 6,
                  "\(differing.count) of \(plain.history.count) steps differ"
                  + (differing.first.map { ", e.g. step \($0.0.step): loss \($0.0.loss) vs \($0.1.loss), norm \($0.0.gradientNorm) vs \($0.1.gradientNorm)" } ?? ""))
        checkTrue("vocabulary-parallel head: the same eval loss", plain.evalLoss.bitPattern == sharded.evalLoss.bitPattern,
                  "\(plain.evalLoss) and \(sharded.evalLoss)")
        checkTrue("vocabulary-parallel head: the same adapter bytes", plain.adapter == sharded.adapter && !plain.adapter.isEmpty,
                  "\(plain.adapter.count) and \(sharded.adapter.count) bytes")
        // d(normed) through the several-rank path: fp32 partial products, ncclReduce to the owner, one rounding.
        let float = try run("float", sharded: true, floatReduction: true)
        let lossError = zip(plain.history, float.history).map { abs($0.loss - $1.loss) / abs($0.loss) }.max() ?? .nan
        let normError = zip(plain.history, float.history).map { abs($0.gradientNorm - $1.gradientNorm) / abs($0.gradientNorm) }.max() ?? .nan
        let sameBits = zip(plain.history, float.history).allSatisfy { $0.loss.bitPattern == $1.loss.bitPattern && $0.gradientNorm.bitPattern == $1.gradientNorm.bitPattern }
            && plain.adapter == float.adapter
        checkTrue("vocabulary-parallel head, d(normed) reduced in fp32: losses and norms within 1e-3 of the plain path",
                  float.history.count == 6 && lossError <= 1e-3 && normError <= 1e-3 && abs(float.evalLoss - plain.evalLoss) <= 1e-3 * abs(plain.evalLoss),
                  "largest relative difference: losses \(fmt(lossError)), norms \(fmt(normError)); "
                  + (sameBits ? "bit for bit (the fp32 GEMM rounded once = the bf16 GEMM here)" : "not bit for bit (the bf16 output stays at W = 1)"))
    }

    group("nccl: vocabulary-parallel head's memory = its plan (random weights, world of one)") {
        let setting = try PlanMemorySetting()
        func peak(_ shardHead: NCCLCollective?) throws -> (bytes: Int, plan: CUDAMemoryPlan, loss: Double, eval: Double) {
            let run = try setting.peak { config, tokens in
                try CUDADecoderTrainer(context: ctx, randomConfig: config, rank: 8, alpha: 16, capacityTokens: tokens, memory: .allOnDevice,
                                       shardHead: shardHead)
            } run: { trainer, batch in
                try trainer.forwardBackward(batch: batch, normalizer: batch.countedTokens)
                let loss = try trainer.lastLoss().mean
                try trainer.forwardLoss(batch: batch)
                return (loss, try trainer.lastLoss().mean)
            }
            return (run.bytes, run.plan, run.result.0, run.result.1)
        }
        let world = setting.world
        let plain = try peak(nil)
        let sharded = try peak(world)
        let mib = { (b: Int) in fmt(Double(b) / Double(1 << 20), 2) + " MiB" }
        checkTrue("vocabulary-parallel head (random weights): the plain path's loss and eval loss",
                  sharded.loss.bitPattern == plain.loss.bitPattern && sharded.eval.bitPattern == plain.eval.bitPattern,
                  "loss \(sharded.loss) vs \(plain.loss), eval \(sharded.eval) vs \(plain.eval)")
        checkTrue("vocabulary-parallel head: the peak changes by what the plan says",
                  sharded.bytes - plain.bytes == sharded.plan.total - plain.plan.total,
                  "peak \(mib(plain.bytes)) -> \(mib(sharded.bytes)); plan \(mib(plain.plan.total)) -> \(mib(sharded.plan.total)) "
                  + "(slice \(mib(sharded.plan.headSlice)), exchange \(mib(sharded.plan.headExchange)))")
    }
}
