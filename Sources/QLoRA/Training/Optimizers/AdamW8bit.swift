// 8-bit AdamW as bitsandbytes does it (bnb.optim.AdamW8bit / PagedAdamW8bit, CUDA kernel
// kOptimizerStatic8bit2StateBlockwise<ADAM>, blocksize 256).
//
// State of a tensor with n ≥ 4096 elements (`min_8bit_size`): two 8-bit code arrays — state1 (first moment)
// in the signed dynamic map, state2 (second moment) in the unsigned one — and one fp32 absmax per
// 256-element block for each. Smaller tensors keep fp32 moments and take the 32-bit kernel (AdamW's
// `.bitsandbytes` arithmetic). For each block b at step t, in Float:
//     c1 = 1 − β1^t,  c2 = √(1 − β2^t),  stepSize = −lr·c2 / c1
//     for each element with a finite gradient g:
//         v = map2[state2] · absmax2[b];  v = v·β2 + ((1 − β2)·g)·g
//         m = map1[state1] · absmax1[b];  m = m·β1 + (1 − β1)·g
//     an element with a non-finite gradient gets m = v = 0 and keeps its parameter
//     absmax1[b] = max |m|, absmax2[b] = max |v| over the block (a short last block also counts the
//         kernel's padding: g = 0, state1 code 128, state2 code 0)
//     p ← p + stepSize · m / (√v + ε·c2);  p ← p · (1 − lr·wd) when wd > 0
//     state1 = quantize(m / absmax1[b]) in the signed map; if that code's sign differs from m's, step one code
//         towards m (so a moment never flips sign); state2 = quantize(v / absmax2[b]) in the unsigned map
// with DynamicQuantizationMap.quantize (the kernel's binary search). The kernel divides with __fdividef,
// an approximate division; here it is IEEE division, so codes can differ from a GPU run in rare ties.
//
// State records: `state.<p>.state1`, `state.<p>.state2` (U8), `state.<p>.absmax1`, `state.<p>.absmax2` (F32)
// for 8-bit tensors; `state.<p>.exp_avg`, `state.<p>.exp_avg_sq` for the small ones; `optimizer.step`.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Dispatch

/// The 8-bit state of one tensor.
final class Quantized8bitMoments {
    var state1: [UInt8]
    var state2: [UInt8]
    var absmax1: [Float]
    var absmax2: [Float]

    init(count: Int) {
        // bitsandbytes starts from zero codes and zero absmax: every moment dequantizes to 0.
        state1 = [UInt8](repeating: 0, count: count)
        state2 = [UInt8](repeating: 0, count: count)
        let blocks = (count + AdamW8bit.blockSize - 1) / AdamW8bit.blockSize
        absmax1 = [Float](repeating: 0, count: blocks)
        absmax2 = [Float](repeating: 0, count: blocks)
    }

    init(state1: [UInt8], state2: [UInt8], absmax1: [Float], absmax2: [Float]) {
        self.state1 = state1
        self.state2 = state2
        self.absmax1 = absmax1
        self.absmax2 = absmax2
    }
}

/// AdamW with 8-bit blockwise-quantized moments, bit-compatible in its arithmetic with bitsandbytes.
public final class AdamW8bit: Optimizer {
    /// Elements per absmax block.
    public static let blockSize = 256
    /// Tensors with fewer elements keep fp32 state (bitsandbytes' `min_8bit_size`).
    public static let minimum8bitSize = 4096

    public let kind: OptimizerKind
    public let hyperparameters: AdamWHyperparameters
    public private(set) var stepCount = 0
    /// Threads one large tensor's blocks are spread over.
    public var threads: Int
    var quantized: [String: Quantized8bitMoments] = [:]
    var small: [String: AdamMoments] = [:]

    public init(_ hyperparameters: AdamWHyperparameters = AdamWHyperparameters(), kind: OptimizerKind = .adamw8bit) throws {
        try hyperparameters.validate()
        precondition(kind.is8bit, "AdamW8bit is for the 8-bit kinds")
        self.hyperparameters = hyperparameters
        self.kind = kind
        threads = min(2, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    }

    public func step(_ slots: [ParameterSlot], learningRate: Double) throws {
        try checkSlots(slots)
        let t = stepCount + 1
        for slot in slots {
            let n = slot.values.count
            if n < AdamW8bit.minimum8bitSize {
                let state = try fetchMoments(for: slot.name, count: n, existing: &small)
                AdamW.bitsandbytesUpdate(slot.values, slot.gradient, state, step: t, lr: learningRate, hyperparameters)
                continue
            }
            let state: Quantized8bitMoments
            if let s = quantized[slot.name] {
                guard s.state1.count == n else {
                    throw UsageError("optimizer state of '\(slot.name)' holds \(s.state1.count) values but the parameter has \(n)")
                }
                state = s
            } else {
                state = Quantized8bitMoments(count: n)
                quantized[slot.name] = state
            }
            AdamW8bit.update(slot.values, slot.gradient, state, step: t, lr: learningRate, hyperparameters, threads: threads)
        }
        stepCount = t
    }

    public func state() -> [TensorRecord] {
        var records = [OptimizerStateRecords.step(stepCount)]
        for name in Set(quantized.keys).union(small.keys).sorted() {
            if let q = quantized[name] {
                records.append(OptimizerStateRecords.bytes("state.\(name).state1", q.state1))
                records.append(OptimizerStateRecords.bytes("state.\(name).state2", q.state2))
                records.append(OptimizerStateRecords.floats("state.\(name).absmax1", q.absmax1))
                records.append(OptimizerStateRecords.floats("state.\(name).absmax2", q.absmax2))
            } else if let m = small[name] {
                records.append(OptimizerStateRecords.floats("state.\(name).exp_avg", m.expAvg))
                records.append(OptimizerStateRecords.floats("state.\(name).exp_avg_sq", m.expAvgSq))
            }
        }
        return records
    }

    public func load(state file: SafeTensorsFile) throws {
        let step = try OptimizerStateRecords.readStep(file)
        let newSmall = try AdamW.readMoments(file, allowing: ["state1", "state2", "absmax1", "absmax2"])
        var parts: [String: [String: TensorInfo]] = [:]
        for info in file.tensors {
            guard let (parameter, buffer) = OptimizerStateRecords.split(info.name),
                  ["state1", "state2", "absmax1", "absmax2"].contains(buffer) else { continue }
            parts[parameter, default: [:]][buffer] = info
        }
        var newQuantized: [String: Quantized8bitMoments] = [:]
        for (parameter, buffers) in parts {
            func need(_ b: String) throws -> TensorInfo {
                guard let info = buffers[b] else {
                    throw FileFormatError(file: file.path, place: "tensor 'state.\(parameter).\(b)'", "missing (the other 8-bit state buffers are present)")
                }
                return info
            }
            let s1 = try OptimizerStateRecords.readBytes(file, try need("state1"))
            let s2 = try OptimizerStateRecords.readBytes(file, try need("state2"))
            let a1 = try OptimizerStateRecords.readFloats(file, try need("absmax1"))
            let a2 = try OptimizerStateRecords.readFloats(file, try need("absmax2"))
            let blocks = (s1.count + AdamW8bit.blockSize - 1) / AdamW8bit.blockSize
            guard s2.count == s1.count, a1.count == blocks, a2.count == blocks, s1.count >= AdamW8bit.minimum8bitSize else {
                throw FileFormatError(file: file.path, place: "tensor 'state.\(parameter).state1'",
                                      "8-bit state sizes disagree: state1 \(s1.count), state2 \(s2.count), absmax1 \(a1.count), absmax2 \(a2.count) (expected \(blocks) blocks of \(AdamW8bit.blockSize), at least \(AdamW8bit.minimum8bitSize) values)")
            }
            guard newSmall[parameter] == nil else {
                throw FileFormatError(file: file.path, place: "tensor 'state.\(parameter).exp_avg'", "a parameter has both 8-bit and fp32 state")
            }
            newQuantized[parameter] = Quantized8bitMoments(state1: s1, state2: s2, absmax1: a1, absmax2: a2)
        }
        for (name, m) in newSmall where m.expAvg.count >= AdamW8bit.minimum8bitSize {
            throw FileFormatError(file: file.path, place: "tensor 'state.\(name).exp_avg'",
                                  "fp32 state of \(m.expAvg.count) values; 8-bit AdamW keeps tensors of \(AdamW8bit.minimum8bitSize) or more in 8 bits")
        }
        quantized = newQuantized
        small = newSmall
        stepCount = step
    }

    // MARK: Kernel

    /// One 8-bit update of a tensor, blocks spread over `threads`.
    static func update(_ p: UnsafeMutableBufferPointer<Float>, _ g: UnsafeBufferPointer<Float>, _ state: Quantized8bitMoments,
                       step t: Int, lr: Double, _ h: AdamWHyperparameters, threads: Int) {
        let n = p.count
        let blocks = (n + blockSize - 1) / blockSize
        let c = BitsandbytesAdamScalars(step: t, lr: lr, h)
        DynamicQuantizationMap.signed.values.withUnsafeBufferPointer { map1 in
            DynamicQuantizationMap.unsigned.values.withUnsafeBufferPointer { map2 in
                state.state1.withUnsafeMutableBufferPointer { s1 in
                    state.state2.withUnsafeMutableBufferPointer { s2 in
                        state.absmax1.withUnsafeMutableBufferPointer { a1 in
                            state.absmax2.withUnsafeMutableBufferPointer { a2 in
                                let k = Kernel(p: p.baseAddress!, g: g.baseAddress!, state1: s1.baseAddress!, state2: s2.baseAddress!,
                                               absmax1: a1.baseAddress!, absmax2: a2.baseAddress!,
                                               map1: map1.baseAddress!, map2: map2.baseAddress!, n: n, c: c)
                                let chunks = threads > 1 && n >= 65_536 ? threads : 1
                                if chunks == 1 {
                                    k.run(blocks: 0..<blocks)
                                } else {
                                    DispatchQueue.concurrentPerform(iterations: chunks) { i in
                                        k.run(blocks: (blocks * i / chunks)..<(blocks * (i + 1) / chunks))
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Pointers and scalars of one update; `run` processes a range of blocks.
    struct Kernel: @unchecked Sendable {
        let p: UnsafeMutablePointer<Float>
        let g: UnsafePointer<Float>
        let state1, state2: UnsafeMutablePointer<UInt8>
        let absmax1, absmax2: UnsafeMutablePointer<Float>
        let map1, map2: UnsafePointer<Float>
        let n: Int
        let c: BitsandbytesAdamScalars

        func run(blocks: Range<Int>) {
            // The block's new moments, between the max pass and the quantize pass.
            let m = UnsafeMutablePointer<Float>.allocate(capacity: 2 * AdamW8bit.blockSize)
            defer { m.deallocate() }
            let v = m + AdamW8bit.blockSize
            for b in blocks {
                let start = b * AdamW8bit.blockSize
                let count = min(AdamW8bit.blockSize, n - start)
                let a1 = absmax1[b], a2 = absmax2[b]
                var max1 = -Float.greatestFiniteMagnitude, max2 = -Float.greatestFiniteMagnitude
                for j in 0..<count {
                    let gi = g[start + j]
                    var mi: Float = 0, vi: Float = 0
                    if gi.isFinite {
                        vi = map2[Int(state2[start + j])] * a2
                        vi = vi * c.beta2 + (c.oneMinusBeta2 * gi) * gi
                        mi = map1[Int(state1[start + j])] * a1
                        mi = mi * c.beta1 + c.oneMinusBeta1 * gi
                    }
                    m[j] = mi
                    v[j] = vi
                    max1 = Float.maximum(max1, abs(mi))
                    max2 = Float.maximum(max2, abs(vi))
                }
                if count < AdamW8bit.blockSize {
                    // The kernel's padding of a short block: g = 0, state1 code 128, state2 code 0.
                    let pad1 = (map1[128] * a1) * c.beta1 + c.oneMinusBeta1 * 0
                    let pad2 = (map2[0] * a2) * c.beta2 + (c.oneMinusBeta2 * 0) * 0
                    max1 = Float.maximum(max1, abs(pad1))
                    max2 = Float.maximum(max2, abs(pad2))
                }
                absmax1[b] = max1
                absmax2[b] = max2
                for j in 0..<count {
                    let i = start + j
                    let mi = m[j], vi = v[j]
                    if g[i].isFinite {
                        var pi = p[i] + c.stepSize * (mi / (vi.squareRoot() + c.epsCorrection2))
                        if c.applyDecay { pi = pi * c.decay }
                        p[i] = pi
                    }
                    var q1 = DynamicQuantizationMap.quantize(mi / max1, map1, signed: true)
                    if (map1[Int(q1)].sign == .minus) != (mi.sign == .minus) {
                        q1 = mi > 0 ? q1 &+ 1 : q1 &- 1
                    }
                    state1[i] = q1
                    state2[i] = DynamicQuantizationMap.quantize(vi / max2, map2, signed: false)
                }
            }
        }
    }
}
