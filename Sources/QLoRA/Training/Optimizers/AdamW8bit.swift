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

/// The 8-bit state of one tensor, in buffers it owns (the kernel writes them through raw pointers).
final class Quantized8bitMoments {
    let state1: UnsafeMutableBufferPointer<UInt8>
    let state2: UnsafeMutableBufferPointer<UInt8>
    let absmax1: UnsafeMutableBufferPointer<Float>
    let absmax2: UnsafeMutableBufferPointer<Float>

    /// bitsandbytes' initial state: zero codes and zero absmax, so every moment dequantizes to 0.
    convenience init(count: Int) {
        let blocks = (count + AdamW8bit.blockSize - 1) / AdamW8bit.blockSize
        self.init(state1: [UInt8](repeating: 0, count: count), state2: [UInt8](repeating: 0, count: count),
                  absmax1: [Float](repeating: 0, count: blocks), absmax2: [Float](repeating: 0, count: blocks))
    }

    init(state1: [UInt8], state2: [UInt8], absmax1: [Float], absmax2: [Float]) {
        func copy<T>(_ a: [T]) -> UnsafeMutableBufferPointer<T> {
            let b = UnsafeMutableBufferPointer<T>.allocate(capacity: a.count)
            _ = b.initialize(from: a)
            return b
        }
        self.state1 = copy(state1)
        self.state2 = copy(state2)
        self.absmax1 = copy(absmax1)
        self.absmax2 = copy(absmax2)
    }

    deinit {
        state1.deallocate()
        state2.deallocate()
        absmax1.deallocate()
        absmax2.deallocate()
    }

    var count: Int { state1.count }
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
    /// Threads the blocks of all 8-bit tensors are spread over (2 at most by default).
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
        var big: [(ParameterSlot, Quantized8bitMoments)] = []
        for slot in slots where slot.values.count >= AdamW8bit.minimum8bitSize {
            let n = slot.values.count
            if let s = quantized[slot.name] {
                guard s.count == n else {
                    throw UsageError("optimizer state of '\(slot.name)' holds \(s.state1.count) values but the parameter has \(n)")
                }
                big.append((slot, s))
            } else {
                big.append((slot, Quantized8bitMoments(count: n)))
            }
        }
        var smallStates: [(ParameterSlot, AdamMoments)] = []
        for slot in slots where slot.values.count < AdamW8bit.minimum8bitSize {
            smallStates.append((slot, try fetchMoments(for: slot.name, count: slot.values.count, existing: &small)))
        }
        // No parameter changes before every size check has passed.
        for (slot, state) in big { quantized[slot.name] = state }
        for (slot, state) in smallStates {
            AdamW.bitsandbytesUpdate(slot.values, slot.gradient, state, step: t, lr: learningRate, hyperparameters)
        }
        AdamW8bit.update(big, step: t, lr: learningRate, hyperparameters, threads: threads)
        stepCount = t
    }

    public func state() -> [TensorRecord] {
        var records = [OptimizerStateRecords.step(stepCount)]
        for name in Set(quantized.keys).union(small.keys).sorted() {
            if let q = quantized[name] {
                records.append(OptimizerStateRecords.bytes("state.\(name).state1", Array(q.state1)))
                records.append(OptimizerStateRecords.bytes("state.\(name).state2", Array(q.state2)))
                records.append(OptimizerStateRecords.floats("state.\(name).absmax1", Array(q.absmax1)))
                records.append(OptimizerStateRecords.floats("state.\(name).absmax2", Array(q.absmax2)))
            } else if let m = small[name] {
                records.append(OptimizerStateRecords.floats("state.\(name).exp_avg", m.expAvg))
                records.append(OptimizerStateRecords.floats("state.\(name).exp_avg_sq", m.expAvgSq))
            }
        }
        return records
    }

    public func retainState(of names: Set<String>) {
        quantized = quantized.filter { names.contains($0.key) }
        small = small.filter { names.contains($0.key) }
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

    /// One 8-bit update of every tensor; all their blocks together are spread over `threads`.
    static func update(_ tensors: [(ParameterSlot, Quantized8bitMoments)], step t: Int, lr: Double,
                       _ h: AdamWHyperparameters, threads: Int) {
        guard !tensors.isEmpty else { return }
        let c = BitsandbytesAdamScalars(step: t, lr: lr, h)
        let map1 = DynamicQuantizationMap.signedTable, map2 = DynamicQuantizationMap.unsignedTable
        var kernels: [Kernel] = []
        var firstBlock: [Int] = [0]
        for (slot, state) in tensors {
            let n = slot.values.count
            kernels.append(Kernel(p: slot.values.baseAddress!, g: slot.gradient.baseAddress!,
                                  state1: state.state1.baseAddress!, state2: state.state2.baseAddress!,
                                  absmax1: state.absmax1.baseAddress!, absmax2: state.absmax2.baseAddress!,
                                  map1: map1, map2: map2, shortcut1: DynamicQuantizationMap.signedShortcut,
                                  shortcut2: DynamicQuantizationMap.unsignedShortcut, n: n, c: c))
            firstBlock.append(firstBlock.last! + (n + blockSize - 1) / blockSize)
        }
        let totalBlocks = firstBlock.last!
        // Runs the blocks [from, to) of the concatenation of all tensors' blocks.
        func run(_ from: Int, _ to: Int) {
            for k in kernels.indices where firstBlock[k + 1] > from && firstBlock[k] < to {
                kernels[k].run(blocks: (max(from, firstBlock[k]) - firstBlock[k])..<(min(to, firstBlock[k + 1]) - firstBlock[k]))
            }
        }
        let chunks = threads > 1 && totalBlocks >= 256 ? threads : 1
        if chunks == 1 {
            run(0, totalBlocks)
        } else {
            DispatchQueue.concurrentPerform(iterations: chunks) { i in
                run(totalBlocks * i / chunks, totalBlocks * (i + 1) / chunks)
            }
        }
        withExtendedLifetime(tensors) {}
    }

    /// Pointers and scalars of one update; `run` processes a range of blocks.
    struct Kernel: @unchecked Sendable {
        let p: UnsafeMutablePointer<Float>
        let g: UnsafePointer<Float>
        let state1, state2: UnsafeMutablePointer<UInt8>
        let absmax1, absmax2: UnsafeMutablePointer<Float>
        let map1, map2: UnsafePointer<Float>
        let shortcut1, shortcut2: UnsafePointer<UInt32>
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
                    // fmaxf as the kernel uses it: a NaN moment does not become the max.
                    let size1 = abs(mi), size2 = abs(vi)
                    max1 = size1 > max1 ? size1 : max1
                    max2 = size2 > max2 ? size2 : max2
                }
                if count < AdamW8bit.blockSize {
                    // The kernel's padding of a short block: g = 0, state1 code 128, state2 code 0.
                    let pad1 = (map1[128] * a1) * c.beta1 + c.oneMinusBeta1 * 0
                    let pad2 = (map2[0] * a2) * c.beta2 + (c.oneMinusBeta2 * 0) * 0
                    max1 = abs(pad1) > max1 ? abs(pad1) : max1
                    max2 = abs(pad2) > max2 ? abs(pad2) : max2
                }
                absmax1[b] = max1
                absmax2[b] = max2
                for j in 0..<count {
                    let i = start + j
                    let mi = m[j], vi = v[j]
                    if g[i].isFinite {
                        p[i] = (p[i] + c.stepSize * (mi / (vi.squareRoot() + c.epsCorrection2))) * c.decay
                    }
                    var q1 = DynamicQuantizationMap.quantize(mi / max1, map1, shortcut: shortcut1)
                    if (map1[Int(q1)].sign == .minus) != (mi.sign == .minus) {
                        q1 = mi > 0 ? q1 &+ 1 : q1 &- 1
                    }
                    state1[i] = q1
                    state2[i] = DynamicQuantizationMap.quantize(vi / max2, map2, shortcut: shortcut2)
                }
            }
        }
    }
}
