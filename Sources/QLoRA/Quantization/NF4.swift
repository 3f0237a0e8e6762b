// 4-bit code books (NF4, FP4) and blockwise absmax quantization, bit-compatible with bitsandbytes.
//
// Derivation and the exact operation order (bitsandbytes csrc/kernels.cu, kQuantizeBlockwise and
// kQuantizeBlockwiseSmall, compiled with --use_fast_math):
//
//   1. The input is flattened row-major and cut into blocks of `blocksize` elements; the last block may
//      be partial. For a block b:        absmax[b] = max |x_i|          (fp32, exact: max has no rounding)
//   2. The scale is the fp32 reciprocal  s = 1 / absmax[b], and each element is scaled by a multiply,
//      y_i = x_i * s (fp32), not a division. (bitsandbytes' kernel computes 1/absmax with the GPU's
//      approximate reciprocal, rcp.approx.ftz.f32, which differs from the correctly rounded 1/absmax by
//      one ulp for about 13% of mantissas; we use the correctly rounded reciprocal. A one-ulp scale
//      difference changes a code only where x*s lies within an ulp of a decision boundary: one element
//      of a random 4096 x 11008 weight, measured with the H100's reciprocal table. All the reference
//      vectors and the tiny-llama checkpoint agree exactly. Denormal inputs, which the kernel flushes
//      to zero, are kept here.)
//   3. y is mapped to a 4-bit code by a decision tree on fixed fp32 thresholds:
//      - NF4: the thresholds are the midpoints between neighbouring code-book values, computed in
//        double and written as decimal literals, which NVCC rounds directly to the nearest fp32.
//        Four of them sit within a hair of halfway between two fp32 values, where rounding through
//        double would pick the other neighbour, so we keep NVCC's bit patterns (checked in its PTX).
//      - FP4: a sign bit (x < 0) plus a tree on |x| with thresholds at midpoints of the FP4 magnitudes
//        divided by 12.
//      Each tree is a binary search with strict `>` over sorted thresholds, so a code is also the
//      number of thresholds below y (FP4: the rank of |y| mapped to its bit pattern); the quantizer
//      counts that way, eight lanes at a time, without branches.
//      NaN compares false everywhere, so it takes code 0 in both trees. An all-zero block has
//      absmax 0, s = +inf and 0 * inf = NaN: every element of such a block gets code 0 (NF4: -1.0,
//      which dequantizes to -0.0), exactly as on the GPU.
//   4. Packing: element 2k goes in the high nibble of byte k, element 2k+1 in the low nibble. For an
//      odd element count the missing last element is the kernel's zero padding, quantized with the
//      block's scale (0 * s: NF4 code 7, or 0 when absmax is 0; FP4 code 0).
//
// Dequantization (kDequantizeBlockwise): value = codebook[code] * absmax[b], one fp32 multiply, stored
// into the weight's dtype (so rounded to bf16/f16 for such weights; see QuantizedWeight.dequantize).
// NF4 code book: quantiles of N(0, 1), normalized to [-1, 1], with an exact zero (the QLoRA paper).

/// The 4-bit data types bitsandbytes supports.
public enum QuantType: String, Sendable, CaseIterable {
    case nf4
    case fp4

    /// The dequantization table: the fp32 value of each 4-bit code (as the CUDA kernel's lookup table).
    public var codebook: [Float] {
        switch self {
        case .nf4: return NF4Tables.nf4Codebook
        case .fp4: return NF4Tables.fp4Codebook
        }
    }

    /// The 16-entry `quant_map` that bitsandbytes saves next to a weight (`get_4bit_type`):
    /// for NF4 the code book; for FP4 the list [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, ...] / 12 in fp32
    /// (its code 8 is +0, while the kernel's dequantization gives -0).
    public var quantMap: [Float] {
        switch self {
        case .nf4: return NF4Tables.nf4Codebook
        case .fp4:
            let raw: [Float] = [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3]
            return raw.map { $0 / 12 }
        }
    }

    /// The 4-bit code of an already scaled value (nominally in [-1, 1]), as the CUDA kernel picks it.
    @inline(__always)
    public func code(_ x: Float) -> UInt8 {
        switch self {
        case .nf4: return quantizeNF4(x)
        case .fp4: return quantizeFP4(x)
        }
    }
}

/// Fixed tables shared by quantization and dequantization.
enum NF4Tables {
    /// NF4 values by code (bit patterns of the fp32 constants in bitsandbytes' `nf4_dequantization_lut`).
    static let nf4Codebook: [Float] = [
        0xBF80_0000, 0xBF32_39B1, 0xBF06_6B30, 0xBECA_32A0, 0xBE91_A24D, 0xBE3D_353F, 0xBDBA_7871, 0x0000_0000,
        0x3DA2_FAFF, 0x3E24_CAE3, 0x3E7C_04DD, 0x3EAD_033A, 0x3EE1_A4B8, 0x3F10_07AB, 0x3F39_13B3, 0x3F80_0000,
    ].map { Float(bitPattern: $0) }

    /// FP4 magnitudes by the low three bits (`fp4_dequantization_lut`); the sign bit negates (so code 8 is -0).
    static let fp4Magnitudes: [Float] = [
        0x0000_0000, 0x3BAA_AAAB, 0x3F2A_AAAB, 0x3F80_0000, 0x3EAA_AAAB, 0x3F00_0000, 0x3E2A_AAAB, 0x3E80_0000,
    ].map { Float(bitPattern: $0) }

    static let fp4Codebook: [Float] = (0..<16).map { code in
        let sign: Float = 1 - 2 * Float((code & 0b1000) >> 3)
        return fp4Magnitudes[code & 0b111] * sign
    }
}

// MARK: - Decision trees

// NF4 thresholds as fp32 bit patterns (decimal literals of the kernel, rounded to nearest fp32 as NVCC does).
private let t0 = Float(bitPattern: 0x3D22_FAFF)    //  0.03979014977812767  (7 | 8)
private let t1 = Float(bitPattern: 0x3EC7_53F9)    //  0.3893125355243683   (11 | 12)
private let t2 = Float(bitPattern: 0x3F24_8DAF)    //  0.6427869200706482   (13 | 14)
private let t3 = Float(bitPattern: 0x3F5C_89D9)    //  0.8614784181118011   (14 | 15)
private let t4 = Float(bitPattern: 0x3F00_6D03)    //  0.5016634166240692   (12 | 13)
private let t5 = Float(bitPattern: 0x3E50_67E0)    //  0.2035212516784668   (9 | 10)
private let t6 = Float(bitPattern: 0x3E95_82D4)    //  0.2920137718319893   (10 | 11)
private let t7 = Float(bitPattern: 0x3DF6_4863)    //  0.1202552504837513   (8 | 9)
private let t8 = Float(bitPattern: 0xBEAD_EA76)    // -0.33967943489551544  (3 | 4)
private let t9 = Float(bitPattern: 0xBE0D_38BC)    // -0.13791173323988914  (5 | 6)
private let t10 = Float(bitPattern: 0xBD3A_7871)   // -0.045525018125772476 (6 | 7)
private let t11 = Float(bitPattern: 0xBE70_3CEC)   // -0.23460740596055984  (4 | 5)
private let t12 = Float(bitPattern: 0xBF1C_5270)   // -0.6106329262256622   (1 | 2)
private let t13 = Float(bitPattern: 0xBEEB_8480)   // -0.4599952697753906   (2 | 3)
private let t14 = Float(bitPattern: 0xBF59_1CD9)   // -0.8480964004993439   (0 | 1)

/// NF4 code of a scaled value: bitsandbytes' `dQuantizeNF4` decision tree (strict `>` at every node).
@inline(__always)
public func quantizeNF4(_ x: Float) -> UInt8 {
    if x > t0 {
        if x > t1 {
            if x > t2 { return x > t3 ? 0b1111 : 0b1110 }
            return x > t4 ? 0b1101 : 0b1100
        }
        if x > t5 { return x > t6 ? 0b1011 : 0b1010 }
        return x > t7 ? 0b1001 : 0b1000
    }
    if x > t8 {
        if x > t9 { return x > t10 ? 0b0111 : 0b0110 }
        return x > t11 ? 0b0101 : 0b0100
    }
    if x > t12 { return x > t13 ? 0b0011 : 0b0010 }
    return x > t14 ? 0b0001 : 0b0000
}

// FP4 thresholds on |x| (the kernel's literals, nearest fp32).
private let f0 = Float(bitPattern: 0x3E95_5555)    // 0.29166667
private let f1 = Float(bitPattern: 0x3F15_5550)    // 0.583333
private let f2 = Float(bitPattern: 0x3F55_5555)    // 0.8333333
private let f3 = Float(bitPattern: 0x3ED5_5556)    // 0.4166667
private let f4 = Float(bitPattern: 0x3DB0_0000)    // 0.0859375
private let f5 = Float(bitPattern: 0x3E55_5555)    // 0.20833333
private let f6 = Float(bitPattern: 0x3B2A_AAB9)    // 0.00260417

/// FP4 code of a scaled value: bitsandbytes' `dQuantizeFP4` (sign bit 0b1000 for x < 0, tree on |x|).
@inline(__always)
public func quantizeFP4(_ x: Float) -> UInt8 {
    let sign: UInt8 = x < 0 ? 0b1000 : 0
    let a = abs(x)
    if a > f0 {
        if a > f1 { return (a > f2 ? 0b0011 : 0b0010) + sign }
        return (a > f3 ? 0b0101 : 0b0100) + sign
    }
    if a > f4 { return (a > f5 ? 0b0111 : 0b0110) + sign }
    return (a > f6 ? 0b0001 : 0b0000) + sign
}

// MARK: - Blockwise quantization

/// Result of blockwise 4-bit quantization: packed codes (two per byte, first in the high nibble)
/// and one fp32 absmax per block.
public struct Blockwise4Bit: Sendable, Equatable {
    public var packed: [UInt8]
    public var absmax: [Float]
}

/// The block sizes bitsandbytes accepts for 4-bit quantization.
public let supported4BitBlocksizes: Set<Int> = [32, 64, 128, 256, 512, 1024, 2048, 4096]

/// Quantizes `values` (the row-major flatten of a tensor) blockwise to 4 bits, as
/// `bitsandbytes.functional.quantize_4bit(A, blocksize:, quant_type:)` on CUDA.
/// Blocksize must be one of `supported4BitBlocksizes` (checked by callers that take user input).
public func quantize4Bit(_ values: UnsafeBufferPointer<Float>, blocksize: Int, type: QuantType) -> Blockwise4Bit {
    precondition(blocksize > 0 && blocksize % 2 == 0, "blocksize must be even and positive")
    let n = values.count
    let blocks = (n + blocksize - 1) / blocksize
    var packed = [UInt8](repeating: 0, count: (n + 1) / 2)
    var absmax = [Float](repeating: 0, count: blocks)
    packed.withUnsafeMutableBufferPointer { out in
        absmax.withUnsafeMutableBufferPointer { am in
            quantizeBlocks(values, blocksize: blocksize, type: type, packed: out, absmax: am)
        }
    }
    return Blockwise4Bit(packed: packed, absmax: absmax)
}

/// Array convenience for `quantize4Bit(_:blocksize:type:)`.
public func quantize4Bit(_ values: [Float], blocksize: Int, type: QuantType) -> Blockwise4Bit {
    values.withUnsafeBufferPointer { quantize4Bit($0, blocksize: blocksize, type: type) }
}

/// Sorted decision thresholds: the code's rank is the number of thresholds strictly below the value,
/// which is what the kernels' trees compute (each tree is a binary search over these with `>`;
/// NaN is below nothing, so it ranks 0 like in the trees).
enum QuantizeThresholds {
    /// NF4: rank = code.
    static let nf4: [Float] = [t14, t12, t13, t8, t11, t9, t10, t0, t7, t5, t6, t1, t4, t2, t3]
    /// FP4 on |x|: rank 0...7 → code bits (magnitudes 0, 0.0625, 2, 3, 4, 6, 8, 12 have codes 0, 1, 6, 7, 4, 5, 2, 3).
    static let fp4: [Float] = [f6, f4, f5, f0, f3, f1, f2]
    static let fp4RankToCode: [UInt8] = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011]
}

/// The hot loop. Eight elements at a time, branch-free: the absmax is a max-reduction, and each code is
/// a count of thresholds below the scaled value (equal to the kernel's tree, checked in NF4Tests).
@inline(__always)
private func quantizeBlocks(
    _ x: UnsafeBufferPointer<Float>, blocksize: Int, type: QuantType,
    packed: UnsafeMutableBufferPointer<UInt8>, absmax: UnsafeMutableBufferPointer<Float>
) {
    let n = x.count
    guard let base = x.baseAddress, let out = packed.baseAddress else { return }
    let thresholds = type == .nf4 ? QuantizeThresholds.nf4 : QuantizeThresholds.fp4
    let t = thresholds.map { SIMD8<Float>(repeating: $0) }
    let rankToCode = QuantizeThresholds.fp4RankToCode
    let isNF4 = type == .nf4

    var start = 0
    var block = 0
    while start < n {
        let end = min(start + blocksize, n)
        // absmax: `a > m ? a : m` ignores NaN, as the kernel's fmaxf does.
        // Index arithmetic wraps (&+): every index stays below n, and checked adds slow the loop.
        var m8 = SIMD8<Float>(repeating: 0)
        var i = start
        while i &+ 8 <= end {
            let a = SIMD8<Float>(UnsafeBufferPointer(start: base + i, count: 8))
            let mag = a.replacing(with: -a, where: a .< SIMD8<Float>(repeating: 0))
            m8.replace(with: mag, where: mag .> m8)
            i &+= 8
        }
        var m = m8.max()
        while i < end {
            let a = abs(base[i])
            if a > m { m = a }
            i += 1
        }
        absmax[block] = m
        let scale: Float = 1 / m
        let scale8 = SIMD8<Float>(repeating: scale)

        i = start
        while i &+ 8 <= end {
            var y = SIMD8<Float>(UnsafeBufferPointer(start: base + i, count: 8)) * scale8
            var negative = SIMD8<Int32>(repeating: 0)
            if !isNF4 {
                let isNegative = y .< SIMD8<Float>(repeating: 0)
                negative.replace(with: 0b1000, where: isNegative)
                y.replace(with: -y, where: isNegative)
            }
            var rank = SIMD8<Int32>(repeating: 0)
            for tk in t { rank &+= SIMD8<Int32>(repeating: 0).replacing(with: 1, where: y .> tk) }
            for k in stride(from: 0, to: 8, by: 2) {
                let hi: UInt8, lo: UInt8
                if isNF4 {
                    hi = UInt8(truncatingIfNeeded: rank[k])
                    lo = UInt8(truncatingIfNeeded: rank[k + 1])
                } else {
                    hi = rankToCode[Int(rank[k])] | UInt8(truncatingIfNeeded: negative[k])
                    lo = rankToCode[Int(rank[k + 1])] | UInt8(truncatingIfNeeded: negative[k + 1])
                }
                out[(i &+ k) >> 1] = (hi << 4) | lo
            }
            i &+= 8
        }
        // The rest of the block (fewer than 8 elements) with the kernel's tree itself.
        while i + 1 < end {
            out[i >> 1] = (type.code(base[i] * scale) << 4) | type.code(base[i + 1] * scale)
            i += 2
        }
        if i < end {
            // Odd total count: the low nibble holds the kernel's zero padding, scaled like the rest.
            out[i >> 1] = (type.code(base[i] * scale) << 4) | type.code(0 * scale)
        }
        start = end
        block += 1
    }
}

// MARK: - Dequantization

/// Pairs of code-book values for every byte: entry b holds (codebook[b >> 4], codebook[b & 15]).
/// Dequantizing a byte is then one table load and one SIMD2 multiply by the block's absmax.
public struct NibblePairTable: Sendable {
    public let pairs: [SIMD2<Float>]

    public init(_ type: QuantType) {
        let cb = type.codebook
        pairs = (0..<256).map { SIMD2(cb[$0 >> 4], cb[$0 & 15]) }
    }

    public static let nf4 = NibblePairTable(.nf4)
    public static let fp4 = NibblePairTable(.fp4)

    public static func of(_ type: QuantType) -> NibblePairTable {
        type == .nf4 ? nf4 : fp4
    }
}

/// Dequantizes `count` elements starting at element `first` of a packed 4-bit tensor into `out`,
/// with fp32 absmax per block: value = codebook[code] * absmax[element / blocksize].
/// `first` may be odd and the range may cross blocks; the inner loop runs on whole bytes.
public func dequantize4Bit(
    packed: UnsafeBufferPointer<UInt8>, absmax: UnsafeBufferPointer<Float>, blocksize: Int, type: QuantType,
    first: Int, count: Int, into out: UnsafeMutablePointer<Float>
) {
    guard count > 0 else { return }
    let table = NibblePairTable.of(type)
    let cb = type.codebook
    table.pairs.withUnsafeBufferPointer { pairsBuf in
        guard let pairs = pairsBuf.baseAddress, let src = packed.baseAddress, let am = absmax.baseAddress else { return }
        @inline(__always) func single(_ e: Int) -> Float {
            let byte = src[e >> 1]
            let c = (e & 1) == 0 ? byte >> 4 : byte & 15
            return cb[Int(c)] * am[e / blocksize]
        }
        var e = first
        let end = first + count
        var o = out
        if e & 1 == 1 {
            o.pointee = single(e)
            o += 1
            e += 1
        }
        while e &+ 1 < end {
            let block = e / blocksize
            let blockEnd = min((block &+ 1) &* blocksize, end)
            let scale = am[block]
            // Whole bytes inside this block: blockEnd - e is even unless blockEnd == end (odd tail).
            let bytes = (blockEnd &- e) >> 1
            let s = src + (e >> 1)
            let scale2 = SIMD2<Float>(repeating: scale)
            // Wrapping index arithmetic and a plain counter: k < bytes, so 2k + 1 cannot overflow, and the
            // checks (and a Range's precondition per block) cost this loop a few per cent (docs/RELIABILITY.md).
            var k = 0
            while k < bytes {
                let v = pairs[Int(s[k])] * scale2
                o[2 &* k] = v.x
                o[2 &* k &+ 1] = v.y
                k &+= 1
            }
            e &+= bytes << 1
            o += bytes << 1
            if bytes == 0 { break }
        }
        while e < end {
            o.pointee = single(e)
            o += 1
            e += 1
        }
    }
}
