// ggml tensor types and their dequantization to Float.
//
// Block layouts (all little-endian; "f16" is an IEEE half; element indices are within one block):
//  F32, F16, BF16, F64, I8..I64: one element per "block", stored plainly.
//  Q4_0  (32 elements, 18 bytes): f16 d, u8 qs[16]. Element j < 16 is the low nibble of qs[j], element j + 16
//        the high nibble; x = (q − 8)·d.
//  Q4_1  (32, 20): f16 d, f16 m, u8 qs[16], nibbles as Q4_0; x = q·d + m.
//  Q5_0  (32, 22): f16 d, u32 qh, u8 qs[16]. Bit j of qh is bit 4 of element j, bit j + 16 of qh is bit 4 of
//        element j + 16 (low 4 bits as Q4_0); x = (q − 16)·d.
//  Q5_1  (32, 24): f16 d, f16 m, u32 qh, u8 qs[16], bits as Q5_0; x = q·d + m.
//  Q8_0  (32, 34): f16 d, i8 qs[32]; x = q·d.
//  The "K" types have super-blocks of 256 elements:
//  Q2_K  (256, 84):  u8 scales[16], u8 qs[64], f16 d, f16 dmin. 16 groups of 16; group scale/min are the
//        low/high nibbles of scales[g]; 2-bit values; x = d·sc·q − dmin·m.
//  Q3_K  (256, 110): u8 hmask[32], u8 qs[64], u8 scales[12] (sixteen 6-bit scales), f16 d. 2 low bits in qs,
//        the third bit in hmask (a clear bit subtracts 4); x = d·(sc − 32)·q.
//  Q4_K  (256, 144): f16 d, f16 dmin, u8 scales[12] (eight 6-bit scales and mins), u8 qs[128].
//        8 groups of 32; x = d·sc·q − dmin·m.
//  Q5_K  (256, 176): f16 d, f16 dmin, u8 scales[12], u8 qh[32], u8 qs[128]; as Q4_K with a fifth bit from qh.
//  Q6_K  (256, 210): u8 ql[128], u8 qh[64], i8 scales[16], f16 d. 16 groups of 16; x = d·sc·(q − 32).
//  Q8_K  (256, 292): f32 d, i8 qs[256], i16 bsums[16]; x = q·d.
// Within each super-block the element order follows ggml's reference `dequantize_row_*` functions, which
// the loops below reproduce (same arithmetic, same order, so the Floats match bit for bit).

/// A ggml tensor element type, as numbered in GGUF files.
public enum GGMLType: UInt32, Sendable, CaseIterable {
    case f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8
    case q2_K = 10, q3_K = 11, q4_K = 12, q5_K = 13, q6_K = 14, q8_K = 15
    case iq2_xxs = 16, iq2_xs = 17, iq3_xxs = 18, iq1_s = 19, iq4_nl = 20, iq3_s = 21, iq2_s = 22, iq4_xs = 23
    case i8 = 24, i16 = 25, i32 = 26, i64 = 27, f64 = 28, iq1_m = 29, bf16 = 30
    case tq1_0 = 34, tq2_0 = 35, mxfp4 = 39

    /// The name llama.cpp uses ("Q4_K", "BF16").
    public var name: String { String(describing: self).uppercased() }

    /// Elements per block.
    public var blockSize: Int {
        switch self {
        case .f32, .f16, .bf16, .f64, .i8, .i16, .i32, .i64: return 1
        case .q4_0, .q4_1, .q5_0, .q5_1, .q8_0, .iq4_nl, .mxfp4: return 32
        default: return 256
        }
    }

    /// Bytes per block.
    public var blockBytes: Int {
        switch self {
        case .f32, .i32: return 4
        case .f16, .bf16, .i16: return 2
        case .f64, .i64: return 8
        case .i8: return 1
        case .q4_0: return 18
        case .q4_1: return 20
        case .q5_0: return 22
        case .q5_1: return 24
        case .q8_0: return 34
        case .q2_K: return 84
        case .q3_K: return 110
        case .q4_K: return 144
        case .q5_K: return 176
        case .q6_K: return 210
        case .q8_K: return 292
        case .iq2_xxs: return 66
        case .iq2_xs: return 74
        case .iq3_xxs: return 98
        case .iq1_s: return 50
        case .iq4_nl: return 18
        case .iq3_s: return 110
        case .iq2_s: return 82
        case .iq4_xs: return 136
        case .iq1_m: return 56
        case .tq1_0: return 54
        case .tq2_0: return 66
        case .mxfp4: return 17
        }
    }

    /// Bytes that `count` elements take (count must be a multiple of the block size).
    public func byteCount(elements count: Int) -> Int { count / blockSize * blockBytes }

    /// Whether `dequantize` handles this type.
    public var canDequantize: Bool {
        switch self {
        case .f32, .f16, .bf16, .f64, .i8, .i16, .i32, .i64,
             .q4_0, .q4_1, .q5_0, .q5_1, .q8_0, .q2_K, .q3_K, .q4_K, .q5_K, .q6_K, .q8_K:
            return true
        default:
            return false
        }
    }

    /// Dequantizes `out.count` elements (a multiple of the block size) from `src`.
    /// Preconditions (checked): `canDequantize`, and `src` holds at least `byteCount(elements: out.count)` bytes.
    public func dequantize(_ src: UnsafeRawBufferPointer, into out: UnsafeMutableBufferPointer<Float>) {
        precondition(canDequantize, "dequantizing \(name) is not supported")
        precondition(out.count % blockSize == 0, "\(out.count) elements is not a whole number of \(name) blocks")
        let blocks = out.count / blockSize
        precondition(src.count >= blocks * blockBytes, "\(name): \(src.count) bytes cannot hold \(out.count) elements")
        guard blocks > 0, let y = out.baseAddress else { return }
        let b = blockBytes
        switch self {
        case .f32: for i in 0..<blocks { y[i] = src.loadUnaligned(fromByteOffset: 4 * i, as: Float.self) }
        case .f16: for i in 0..<blocks { y[i] = f16ToFloat(src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
        case .bf16: for i in 0..<blocks { y[i] = bf16ToFloat(src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
        case .f64: for i in 0..<blocks { y[i] = Float(src.loadUnaligned(fromByteOffset: 8 * i, as: Double.self)) }
        case .i8: for i in 0..<blocks { y[i] = Float(Int8(bitPattern: src[i])) }
        case .i16: for i in 0..<blocks { y[i] = Float(src.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self)) }
        case .i32: for i in 0..<blocks { y[i] = Float(src.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self)) }
        case .i64: for i in 0..<blocks { y[i] = Float(src.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self)) }
        case .q4_0: for i in 0..<blocks { Self.q4_0(src, i * b, y + 32 * i) }
        case .q4_1: for i in 0..<blocks { Self.q4_1(src, i * b, y + 32 * i) }
        case .q5_0: for i in 0..<blocks { Self.q5_0(src, i * b, y + 32 * i) }
        case .q5_1: for i in 0..<blocks { Self.q5_1(src, i * b, y + 32 * i) }
        case .q8_0: for i in 0..<blocks { Self.q8_0(src, i * b, y + 32 * i) }
        case .q2_K: for i in 0..<blocks { Self.q2_K(src, i * b, y + 256 * i) }
        case .q3_K: for i in 0..<blocks { Self.q3_K(src, i * b, y + 256 * i) }
        case .q4_K: for i in 0..<blocks { Self.q4_K(src, i * b, y + 256 * i) }
        case .q5_K: for i in 0..<blocks { Self.q5_K(src, i * b, y + 256 * i) }
        case .q6_K: for i in 0..<blocks { Self.q6_K(src, i * b, y + 256 * i) }
        case .q8_K: for i in 0..<blocks { Self.q8_K(src, i * b, y + 256 * i) }
        default: preconditionFailure("unreachable: canDequantize was checked")
        }
    }

    // MARK: - Block decoders (p: the block's byte offset in s; y: its 32 or 256 outputs)

    @inline(__always)
    private static func half(_ s: UnsafeRawBufferPointer, _ p: Int) -> Float {
        f16ToFloat(s.loadUnaligned(fromByteOffset: p, as: UInt16.self))
    }

    private static func q4_0(_ s: UnsafeRawBufferPointer, _ p: Int, _ y: UnsafeMutablePointer<Float>) {
        let d = half(s, p)
        for j in 0..<16 {
            let q = s[p + 2 + j]
            y[j] = Float(Int32(q & 0x0F) - 8) * d
            y[j + 16] = Float(Int32(q >> 4) - 8) * d
        }
    }

    private static func q4_1(_ s: UnsafeRawBufferPointer, _ p: Int, _ y: UnsafeMutablePointer<Float>) {
        let d = half(s, p), m = half(s, p + 2)
        for j in 0..<16 {
            let q = s[p + 4 + j]
            y[j] = Float(q & 0x0F) * d + m
            y[j + 16] = Float(q >> 4) * d + m
        }
    }

    private static func q5_0(_ s: UnsafeRawBufferPointer, _ p: Int, _ y: UnsafeMutablePointer<Float>) {
        let d = half(s, p)
        let qh = UInt32(littleEndian: s.loadUnaligned(fromByteOffset: p + 2, as: UInt32.self))
        for j in 0..<16 {
            let q = UInt32(s[p + 6 + j])
            let h0 = ((qh >> UInt32(j)) << 4) & 0x10
            let h1 = (qh >> UInt32(j + 12)) & 0x10
            y[j] = Float(Int32((q & 0x0F) | h0) - 16) * d
            y[j + 16] = Float(Int32((q >> 4) | h1) - 16) * d
        }
    }

    private static func q5_1(_ s: UnsafeRawBufferPointer, _ p: Int, _ y: UnsafeMutablePointer<Float>) {
        let d = half(s, p), m = half(s, p + 2)
        let qh = UInt32(littleEndian: s.loadUnaligned(fromByteOffset: p + 4, as: UInt32.self))
        for j in 0..<16 {
            let q = UInt32(s[p + 8 + j])
            let h0 = ((qh >> UInt32(j)) << 4) & 0x10
            let h1 = (qh >> UInt32(j + 12)) & 0x10
            y[j] = Float((q & 0x0F) | h0) * d + m
            y[j + 16] = Float((q >> 4) | h1) * d + m
        }
    }

    private static func q8_0(_ s: UnsafeRawBufferPointer, _ p: Int, _ y: UnsafeMutablePointer<Float>) {
        let d = half(s, p)
        for j in 0..<32 { y[j] = Float(Int8(bitPattern: s[p + 2 + j])) * d }
    }

    private static func q2_K(_ s: UnsafeRawBufferPointer, _ p: Int, _ y: UnsafeMutablePointer<Float>) {
        let scales = p, qs = p + 16
        let d = half(s, p + 80), dmin = half(s, p + 82)
        var out = 0, group = 0
        for n in stride(from: 0, to: 256, by: 128) {
            let q = qs + n / 4  // 32 bytes of 2-bit values per 128 elements
            for shift in stride(from: 0, to: 8, by: 2) {
                for half in 0..<2 {
                    let sc = s[scales + group]; group += 1
                    let dl = d * Float(sc & 0x0F), ml = dmin * Float(sc >> 4)
                    for l in 0..<16 {
                        y[out] = dl * Float((s[q + 16 * half + l] >> UInt8(shift)) & 3) - ml
                        out += 1
                    }
                }
            }
        }
    }

    private static func q3_K(_ s: UnsafeRawBufferPointer, _ p: Int, _ y: UnsafeMutablePointer<Float>) {
        let hmask = p, qs = p + 32, packed = p + 96
        let dAll = half(s, p + 108)
        // Sixteen 6-bit scales: low 4 bits from the first 8 bytes (two per byte), high 2 bits from the last 4.
        var aux = [UInt32](repeating: 0, count: 4)
        for i in 0..<3 { aux[i] = UInt32(littleEndian: s.loadUnaligned(fromByteOffset: packed + 4 * i, as: UInt32.self)) }
        let kmask1: UInt32 = 0x0303_0303, kmask2: UInt32 = 0x0F0F_0F0F
        let tmp = aux[2]
        aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4)
        aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4)
        aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4)
        aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4)
        func scale(_ i: Int) -> Int32 { Int32(Int8(truncatingIfNeeded: aux[i / 4] >> UInt32(8 * (i % 4)))) }
        var out = 0, group = 0
        var m: UInt8 = 1
        for n in stride(from: 0, to: 256, by: 128) {
            let q = qs + n / 4
            for shift in stride(from: 0, to: 8, by: 2) {
                for half in 0..<2 {
                    let dl = dAll * Float(scale(group) - 32); group += 1
                    for l in 0..<16 {
                        let low = Int32((s[q + 16 * half + l] >> UInt8(shift)) & 3)
                        let high: Int32 = (s[hmask + 16 * half + l] & m) != 0 ? 0 : 4
                        y[out] = dl * Float(low - high)
                        out += 1
                    }
                }
                m <<= 1
            }
        }
    }

    /// The j-th 6-bit scale and min of Q4_K / Q5_K's 12 packed bytes.
    @inline(__always)
    private static func scaleMinK4(_ s: UnsafeRawBufferPointer, _ q: Int, _ j: Int) -> (Float, Float) {
        if j < 4 {
            return (Float(s[q + j] & 63), Float(s[q + j + 4] & 63))
        }
        let sc = (s[q + j + 4] & 0x0F) | ((s[q + j - 4] >> 6) << 4)
        let m = (s[q + j + 4] >> 4) | ((s[q + j] >> 6) << 4)
        return (Float(sc), Float(m))
    }

    private static func q4_K(_ s: UnsafeRawBufferPointer, _ p: Int, _ y: UnsafeMutablePointer<Float>) {
        let d = half(s, p), dmin = half(s, p + 2)
        let scales = p + 4, qs = p + 16
        for g in 0..<4 {  // 64 elements per step: 32 low nibbles, then 32 high nibbles of the same bytes
            let (sc1, m1) = scaleMinK4(s, scales, 2 * g), (sc2, m2) = scaleMinK4(s, scales, 2 * g + 1)
            let d1 = d * sc1, min1 = dmin * m1, d2 = d * sc2, min2 = dmin * m2
            let q = qs + 32 * g, o = 64 * g
            for l in 0..<32 { y[o + l] = d1 * Float(s[q + l] & 0x0F) - min1 }
            for l in 0..<32 { y[o + 32 + l] = d2 * Float(s[q + l] >> 4) - min2 }
        }
    }

    private static func q5_K(_ s: UnsafeRawBufferPointer, _ p: Int, _ y: UnsafeMutablePointer<Float>) {
        let d = half(s, p), dmin = half(s, p + 2)
        let scales = p + 4, qh = p + 16, qs = p + 48
        var u1: UInt8 = 1, u2: UInt8 = 2
        for g in 0..<4 {
            let (sc1, m1) = scaleMinK4(s, scales, 2 * g), (sc2, m2) = scaleMinK4(s, scales, 2 * g + 1)
            let d1 = d * sc1, min1 = dmin * m1, d2 = d * sc2, min2 = dmin * m2
            let q = qs + 32 * g, o = 64 * g
            for l in 0..<32 {
                let high: UInt8 = (s[qh + l] & u1) != 0 ? 16 : 0
                y[o + l] = d1 * Float((s[q + l] & 0x0F) + high) - min1
            }
            for l in 0..<32 {
                let high: UInt8 = (s[qh + l] & u2) != 0 ? 16 : 0
                y[o + 32 + l] = d2 * Float((s[q + l] >> 4) + high) - min2
            }
            u1 <<= 2; u2 <<= 2
        }
    }

    private static func q6_K(_ s: UnsafeRawBufferPointer, _ p: Int, _ y: UnsafeMutablePointer<Float>) {
        let d = half(s, p + 208)
        for h in 0..<2 {  // two halves of 128 elements
            let ql = p + 64 * h, qh = p + 128 + 32 * h, sc = p + 192 + 8 * h, o = 128 * h
            func scale(_ i: Int) -> Float { Float(Int8(bitPattern: s[sc + i])) }
            for l in 0..<32 {
                let g = l / 16
                let hb = s[qh + l]
                let q1 = Int32((s[ql + l] & 0x0F) | ((hb >> 0) & 3) << 4) - 32
                let q2 = Int32((s[ql + l + 32] & 0x0F) | ((hb >> 2) & 3) << 4) - 32
                let q3 = Int32((s[ql + l] >> 4) | ((hb >> 4) & 3) << 4) - 32
                let q4 = Int32((s[ql + l + 32] >> 4) | ((hb >> 6) & 3) << 4) - 32
                y[o + l] = d * scale(g) * Float(q1)
                y[o + l + 32] = d * scale(g + 2) * Float(q2)
                y[o + l + 64] = d * scale(g + 4) * Float(q3)
                y[o + l + 96] = d * scale(g + 6) * Float(q4)
            }
        }
    }

    private static func q8_K(_ s: UnsafeRawBufferPointer, _ p: Int, _ y: UnsafeMutablePointer<Float>) {
        let d = s.loadUnaligned(fromByteOffset: p, as: Float.self)
        for j in 0..<256 { y[j] = d * Float(Int8(bitPattern: s[p + 4 + j])) }
    }
}
