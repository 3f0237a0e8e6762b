// Quantization of Floats into ggml blocks (the inverse of GGMLQuant.swift), for writing GGUF files.
//
// These follow ggml's reference `quantize_row_*_ref` (as gguf-py does, bit for bit), per block of 32:
//  Q8_0: d = max|x| / 127, q = round(x / d) (half away from zero).
//  Q4_0: m = the x of largest |x| (first if tied), d = m / −8, q = min(15, trunc(x / d + 8.5)).
//  Q5_0: d = m / −16, q = min(31, trunc(x / d + 16.5)); bit 4 of q goes to qh.
//  Q4_1: d = (max − min) / 15, q = min(15, trunc((x − min) / d + 0.5)), stored m = min.
//  Q5_1: d = (max − min) / 31, q = min(31, trunc((x − min) / d + 0.5)).
// "/ d" is a multiplication by 1/d (0 when d is 0), and d, m are computed in f32 before being stored as f16.
//
// Q6_K (blocks of 256, ggml's `quantize_row_q6_K_ref`, which llama-quantize uses when it has no importance matrix):
//  each of the 16 groups of 16 gets a scale from `make_qx_quants(16, nmax 32, rmse_type 1)`: start from
//  iscale = −32 / m (m the value of largest |x|), then try iscale = −(32 + 0.1·is) / m for is in −9…9 and keep the
//  one whose levels l (round half to even, clamped to −32…31) maximise (Σ w·x·l)² / Σ w·l², w = x²; the group
//  scale is Σ w·x·l / Σ w·l². The block's d = −max_scale / 128 (max_scale the group scale of largest magnitude),
//  the group scales become int8 min(127, round(scale / d)), and each x gets l = clamp(round(x / (d·scale_j)), −32, 31) + 32.
//  Bytes: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d (f16): element j + l + 32·k of each
//  128-element half goes to the low/high nibble of ql[l + 32·(k & 1)] (k < 2 low) and to bits 2k..2k+1 of qh[l].
//
// Q4_K and Q5_K (blocks of 256 in 8 sub-blocks of 32, ggml's `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`):
//  each sub-block gets a scale s and a minimum m (x ≈ s·l − m, l in 0…nmax, nmax 15 or 31) from `make_qkx2_quants`:
//  weights w = sqrt(Σx²/32) + |x|; start from min(x, 0) and iscale = nmax / (max − min), then for is in 0…nstep try
//  iscale = (rmin + 0.1·is + nmax) / (max − min) (rmin −1, nstep 20 for Q4_K; −0.5, 15 for Q5_K), fit s and min to
//  those levels by weighted least squares (min clipped to ≤ 0) and keep the fit of least Σ w·(s·l + min − x)².
//  The block stores d = max s / 63 and dmin = max m / 63 (f16) and each sub-block's 6-bit round(63·s / max s) and
//  round(63·m / max m); the levels are then recomputed against the stored scales: l = round((x + dmin·m6) / (d·s6)).
//  Scales bytes (get_scale_min_k4): sub-block j < 4 has scale = scales[j] & 63, min = scales[j + 4] & 63; j ≥ 4 has
//  scale = scales[j + 4] & 15 | (scales[j − 4] >> 6) << 4, min = scales[j + 4] >> 4 | (scales[j] >> 6) << 4.
//  Levels: element l + 64·c (l < 32) in the low nibble of qs[32·c + l], element l + 32 + 64·c in its high nibble;
//  Q5_K's fifth bits go to qh[l], bit 2c for the first and 2c + 1 for the second.
//  Layout Q4_K: d, dmin, scales[12], qs[128]; Q5_K: d, dmin, scales[12], qh[32], qs[128].
//  Rounding is ggml's `nearest_int` (add 1.5·2^23 and read the mantissa), so the bytes match in every case.

extension GGMLType {
    /// Whether `quantize` handles this type.
    public var canQuantize: Bool {
        switch self {
        case .f32, .f16, .bf16, .q8_0, .q4_0, .q4_1, .q5_0, .q5_1, .q4_K, .q5_K, .q6_K: return true
        default: return false
        }
    }

    /// Quantizes `values` (a whole number of blocks) into this type's bytes.
    public func quantize(_ values: [Float]) -> [UInt8] {
        precondition(canQuantize, "quantizing to \(name) is not supported")
        precondition(values.count % blockSize == 0, "\(values.count) values is not a whole number of \(name) blocks")
        var out = [UInt8](repeating: 0, count: byteCount(elements: values.count))
        values.withUnsafeBufferPointer { x in
            out.withUnsafeMutableBytes { y in
                switch self {
                case .f32: for i in 0..<x.count { y.storeBytes(of: x[i].bitPattern.littleEndian, toByteOffset: 4 * i, as: UInt32.self) }
                case .f16: for i in 0..<x.count { y.storeBytes(of: floatToF16(x[i]).littleEndian, toByteOffset: 2 * i, as: UInt16.self) }
                case .bf16: for i in 0..<x.count { y.storeBytes(of: floatToBF16(x[i]).littleEndian, toByteOffset: 2 * i, as: UInt16.self) }
                case .q4_K, .q5_K, .q6_K:
                    for b in 0..<(x.count / 256) {
                        let block = UnsafeBufferPointer(rebasing: x[(256 * b)..<(256 * b + 256)])
                        let dst = UnsafeMutableRawBufferPointer(rebasing: y[(blockBytes * b)..<(blockBytes * (b + 1))])
                        if self == .q6_K { Self.quantizeQ6_K(block, dst) } else { Self.quantizeQ45_K(block, dst, bits5: self == .q5_K) }
                    }
                default:
                    for b in 0..<(x.count / 32) {
                        let block = UnsafeBufferPointer(rebasing: x[(32 * b)..<(32 * b + 32)])
                        let dst = UnsafeMutableRawBufferPointer(rebasing: y[(blockBytes * b)..<(blockBytes * (b + 1))])
                        switch self {
                        case .q8_0: Self.quantizeQ8_0(block, dst)
                        case .q4_0, .q5_0: Self.quantizeSymmetric(block, dst, bits5: self == .q5_0)
                        case .q4_1, .q5_1: Self.quantizeAffine(block, dst, bits5: self == .q5_1)
                        default: preconditionFailure("unreachable")
                        }
                    }
                }
            }
        }
        return out
    }

    private static func storeHalf(_ v: Float, _ y: UnsafeMutableRawBufferPointer, _ at: Int) {
        y.storeBytes(of: floatToF16(v).littleEndian, toByteOffset: at, as: UInt16.self)
    }

    private static func inverse(_ d: Float) -> Float { d == 0 ? 0 : 1 / d }

    /// An integral Float as an Int in lo...hi; NaN (from non-finite input) gives 0 rather than a trap.
    private static func clamped(_ v: Float, _ lo: Int, _ hi: Int) -> Int {
        v.isNaN ? 0 : Int(Swift.max(Float(lo), Swift.min(Float(hi), v)))
    }

    private static func quantizeQ8_0(_ x: UnsafeBufferPointer<Float>, _ y: UnsafeMutableRawBufferPointer) {
        var amax: Float = 0
        for v in x { amax = max(amax, abs(v)) }
        let d = amax / 127, id = inverse(d)
        storeHalf(d, y, 0)
        for j in 0..<32 { y[2 + j] = UInt8(bitPattern: Int8(clamped((x[j] * id).rounded(), -128, 127))) }
    }

    /// Q4_0 and Q5_0: a scale from the value of largest magnitude, no offset.
    private static func quantizeSymmetric(_ x: UnsafeBufferPointer<Float>, _ y: UnsafeMutableRawBufferPointer, bits5: Bool) {
        var amax: Float = 0, extreme: Float = 0
        for v in x where amax < abs(v) { amax = abs(v); extreme = v }
        let levels: Float = bits5 ? 16 : 8
        let d = extreme / -levels, id = inverse(d)
        storeHalf(d, y, 0)
        let top = bits5 ? 31 : 15
        let q = (0..<32).map { j in clamped((x[j] * id + (levels + 0.5)).rounded(.towardZero), 0, top) }
        packNibbles(q, y, qsOffset: bits5 ? 6 : 2, qhOffset: bits5 ? 2 : nil)
    }

    /// Q4_1 and Q5_1: scale and offset from the block's minimum and maximum.
    private static func quantizeAffine(_ x: UnsafeBufferPointer<Float>, _ y: UnsafeMutableRawBufferPointer, bits5: Bool) {
        var lo = Float.greatestFiniteMagnitude, hi = -Float.greatestFiniteMagnitude
        for v in x { lo = min(lo, v); hi = max(hi, v) }
        let top = bits5 ? 31 : 15
        let d = (hi - lo) / Float(top), id = inverse(d)
        storeHalf(d, y, 0)
        storeHalf(lo, y, 2)
        let q = (0..<32).map { j in clamped(((x[j] - lo) * id + 0.5).rounded(.towardZero), 0, top) }
        packNibbles(q, y, qsOffset: bits5 ? 8 : 4, qhOffset: bits5 ? 4 : nil)
    }

    /// ggml's `nearest_int`: round half to even.
    private static func nearestInt(_ v: Float) -> Int {
        v.isFinite ? Int(v.rounded(.toNearestOrEven)) : 0
    }

    /// ggml's `make_qx_quants(n, nmax, x, L, rmse_type = 1, NULL)`: the levels L (0…2·nmax−1) and the scale.
    private static func makeQXQuants(_ x: UnsafeBufferPointer<Float>, nmax: Int, _ levels: inout [Int]) -> Float {
        var maxValue: Float = 0, amax: Float = 0
        for v in x where abs(v) > amax { amax = abs(v); maxValue = v }
        if amax < 1e-15 {
            for i in 0..<x.count { levels[i] = 0 }
            return 0
        }
        func level(_ v: Float, _ iscale: Float) -> Int { Swift.max(-nmax, Swift.min(nmax - 1, nearestInt(iscale * v))) }
        var iscale = Float(-nmax) / maxValue
        var sumlx: Float = 0, suml2: Float = 0
        for i in 0..<x.count {
            let l = level(x[i], iscale)
            levels[i] = l + nmax
            let w = x[i] * x[i]
            sumlx += w * x[i] * Float(l)
            suml2 += w * Float(l) * Float(l)
        }
        var scale: Float = suml2 != 0 ? sumlx / suml2 : 0
        var best = scale * sumlx
        for step in -9...9 where step != 0 {
            iscale = -(Float(nmax) + 0.1 * Float(step)) / maxValue
            sumlx = 0; suml2 = 0
            for i in 0..<x.count {
                let l = level(x[i], iscale)
                let w = x[i] * x[i]
                sumlx += w * x[i] * Float(l)
                suml2 += w * Float(l) * Float(l)
            }
            if suml2 > 0 && sumlx * sumlx > best * suml2 {
                for i in 0..<x.count { levels[i] = nmax + level(x[i], iscale) }
                scale = sumlx / suml2
                best = scale * sumlx
            }
        }
        return scale
    }

    /// One Q6_K block of 256 (see the header).
    private static func quantizeQ6_K(_ x: UnsafeBufferPointer<Float>, _ y: UnsafeMutableRawBufferPointer) {
        var levels = [Int](repeating: 0, count: 256)
        var groupLevels = [Int](repeating: 0, count: 16)
        var scales = [Float](repeating: 0, count: 16)
        var maxScale: Float = 0, maxAbsScale: Float = 0
        for g in 0..<16 {
            let scale = makeQXQuants(UnsafeBufferPointer(rebasing: x[(16 * g)..<(16 * g + 16)]), nmax: 32, &groupLevels)
            for i in 0..<16 { levels[16 * g + i] = groupLevels[i] }
            scales[g] = scale
            if abs(scale) > maxAbsScale { maxAbsScale = abs(scale); maxScale = scale }
        }
        for i in 0..<y.count { y[i] = 0 }
        if maxAbsScale < 1e-15 { return }
        let iscale = -128 / maxScale
        storeHalf(1 / iscale, y, 208)
        let d = f16ToFloat(floatToF16(1 / iscale))
        for g in 0..<16 {
            let q = Int8(Swift.min(127, nearestInt(iscale * scales[g])))
            y[192 + g] = UInt8(bitPattern: q)
            let dg = d * Float(q)
            if dg == 0 { continue }
            for i in 0..<16 { levels[16 * g + i] = Swift.max(-32, Swift.min(31, nearestInt(x[16 * g + i] / dg))) + 32 }
        }
        for h in 0..<2 {
            let j = 128 * h, ql = 64 * h, qh = 128 + 32 * h
            for l in 0..<32 {
                let q1 = levels[j + l], q2 = levels[j + l + 32], q3 = levels[j + l + 64], q4 = levels[j + l + 96]
                y[ql + l] = UInt8(q1 & 0xF) | UInt8(q3 & 0xF) << 4
                y[ql + l + 32] = UInt8(q2 & 0xF) | UInt8(q4 & 0xF) << 4
                y[qh + l] = UInt8(q1 >> 4) | UInt8(q2 >> 4) << 2 | UInt8(q3 >> 4) << 4 | UInt8(q4 >> 4) << 6
            }
        }
    }

    /// ggml's `nearest_int` bit for bit: the float addition of 1.5·2^23 rounds to an integer (half to even) and the
    /// mantissa holds it; values beyond ±2^22 (which ggml asserts away) give ggml's bits too, not a trap.
    private static func ggmlNearestInt(_ v: Float) -> Int {
        Int(Int32(bitPattern: (v + 12_582_912).bitPattern & 0x007F_FFFF) - 0x0040_0000)
    }

    /// ggml's `make_qkx2_quants` (use_mad false) over the 32 values at `x`: writes the levels (0…nmax) into
    /// `levels[offset...]` and returns the scale and the minimum (as −min ≥ 0, ggml's `the_min`).
    private static func makeQKX2Quants(_ x: UnsafeBufferPointer<Float>, weights w: [Float], nmax: Int, rmin: Float, rdelta: Float,
                                       nstep: Int, levels: inout [Int], offset: Int) -> (scale: Float, min: Float) {
        let n = x.count
        var lo = x[0], hi = x[0]
        var sumW = w[0], sumX = w[0] * x[0]
        for i in 1..<n {
            if x[i] < lo { lo = x[i] }
            if x[i] > hi { hi = x[i] }
            sumW += w[i]
            sumX += w[i] * x[i]
        }
        if lo > 0 { lo = 0 }
        if hi == lo {
            for i in 0..<n { levels[offset + i] = 0 }
            return (0, -lo)
        }
        var iscale = Float(nmax) / (hi - lo)
        var scale = 1 / iscale
        var bestError: Float = 0
        for i in 0..<n {
            let l = Swift.max(0, Swift.min(nmax, ggmlNearestInt(iscale * (x[i] - lo))))
            levels[offset + i] = l
            let diff = scale * Float(l) + lo - x[i]
            bestError += w[i] * (diff * diff)
        }
        var trial = [Int](repeating: 0, count: n)
        for step in 0...nstep {
            iscale = (rmin + rdelta * Float(step) + Float(nmax)) / (hi - lo)
            var sumL: Float = 0, sumL2: Float = 0, sumXL: Float = 0
            for i in 0..<n {
                let l = Swift.max(0, Swift.min(nmax, ggmlNearestInt(iscale * (x[i] - lo))))
                trial[i] = l
                let wl = w[i] * Float(l)
                sumL += wl
                sumL2 += wl * Float(l)
                sumXL += wl * x[i]
            }
            let det = sumW * sumL2 - sumL * sumL
            guard det > 0 else { continue }
            var thisScale = (sumW * sumXL - sumX * sumL) / det
            var thisMin = (sumL2 * sumX - sumL * sumXL) / det
            if thisMin > 0 {
                thisMin = 0
                thisScale = sumXL / sumL2
            }
            var error: Float = 0
            for i in 0..<n {
                let diff = thisScale * Float(trial[i]) + thisMin - x[i]
                error += w[i] * (diff * diff)
            }
            if error < bestError {
                for i in 0..<n { levels[offset + i] = trial[i] }
                bestError = error
                scale = thisScale
                lo = thisMin
            }
        }
        return (scale, -lo)
    }

    /// One Q4_K or Q5_K block of 256 (see the header).
    private static func quantizeQ45_K(_ x: UnsafeBufferPointer<Float>, _ y: UnsafeMutableRawBufferPointer, bits5: Bool) {
        let nmax = bits5 ? 31 : 15
        var levels = [Int](repeating: 0, count: 256)
        var scales = [Float](repeating: 0, count: 8), mins = [Float](repeating: 0, count: 8)
        var weights = [Float](repeating: 0, count: 32)
        var maxScale: Float = 0, maxMin: Float = 0
        for j in 0..<8 {
            let sub = UnsafeBufferPointer(rebasing: x[(32 * j)..<(32 * j + 32)])
            var sumX2: Float = 0
            for v in sub { sumX2 += v * v }
            let average = (sumX2 / 32).squareRoot()
            for l in 0..<32 { weights[l] = average + abs(sub[l]) }
            (scales[j], mins[j]) = makeQKX2Quants(sub, weights: weights, nmax: nmax, rmin: bits5 ? -0.5 : -1, rdelta: 0.1,
                                                   nstep: bits5 ? 15 : 20, levels: &levels, offset: 32 * j)
            if scales[j] > maxScale { maxScale = scales[j] }
            if mins[j] > maxMin { maxMin = mins[j] }
        }
        let inverseScale: Float = maxScale > 0 ? 63 / maxScale : 0
        let inverseMin: Float = maxMin > 0 ? 63 / maxMin : 0
        var packed = [UInt8](repeating: 0, count: 12)
        var scale6 = [UInt8](repeating: 0, count: 8), min6 = [UInt8](repeating: 0, count: 8)
        for j in 0..<8 {
            // ggml stores nearest_int's int in a uint8_t (mod 256) before clamping to 63.
            let ls = Swift.min(63, UInt8(truncatingIfNeeded: ggmlNearestInt(inverseScale * scales[j])))
            let lm = Swift.min(63, UInt8(truncatingIfNeeded: ggmlNearestInt(inverseMin * mins[j])))
            scale6[j] = ls
            min6[j] = lm
            if j < 4 {
                packed[j] = ls
                packed[j + 4] = lm
            } else {
                packed[j + 4] = (ls & 0xF) | (lm & 0xF) << 4
                packed[j - 4] |= (ls >> 4) << 6
                packed[j] |= (lm >> 4) << 6
            }
        }
        let dBits = floatToF16(maxScale / 63), dminBits = floatToF16(maxMin / 63)
        y.storeBytes(of: dBits.littleEndian, toByteOffset: 0, as: UInt16.self)
        y.storeBytes(of: dminBits.littleEndian, toByteOffset: 2, as: UInt16.self)
        for i in 0..<12 { y[4 + i] = packed[i] }
        let d = f16ToFloat(dBits), dmin = f16ToFloat(dminBits)
        for j in 0..<8 {
            let dj = d * Float(scale6[j])
            if dj == 0 { continue }  // the sub-block keeps make_qkx2_quants' levels
            let mj = dmin * Float(min6[j])
            for i in 0..<32 { levels[32 * j + i] = Swift.max(0, Swift.min(nmax, ggmlNearestInt((x[32 * j + i] + mj) / dj))) }
        }
        let qs = bits5 ? 48 : 16
        if bits5 { for i in 0..<32 { y[16 + i] = 0 } }
        for c in 0..<4 {
            for l in 0..<32 {
                let low = levels[64 * c + l], high = levels[64 * c + l + 32]
                y[qs + 32 * c + l] = UInt8(low & 0xF) | UInt8(high & 0xF) << 4
                if bits5 {
                    y[16 + l] |= UInt8(low >> 4) << UInt8(2 * c) | UInt8(high >> 4) << UInt8(2 * c + 1)
                }
            }
        }
    }

    /// Low nibbles of elements j and j + 16 into byte j; bit 4 of element j into bit j of the u32 qh.
    private static func packNibbles(_ q: [Int], _ y: UnsafeMutableRawBufferPointer, qsOffset: Int, qhOffset: Int?) {
        var qh: UInt32 = 0
        for j in 0..<16 {
            y[qsOffset + j] = UInt8(q[j] & 0x0F) | UInt8(q[j + 16] & 0x0F) << 4
            qh |= UInt32((q[j] >> 4) & 1) << UInt32(j)
            qh |= UInt32((q[j + 16] >> 4) & 1) << UInt32(j + 16)
        }
        if let qhOffset { y.storeBytes(of: qh.littleEndian, toByteOffset: qhOffset, as: UInt32.self) }
    }
}
