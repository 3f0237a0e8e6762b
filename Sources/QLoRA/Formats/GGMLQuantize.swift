// Quantization of Floats into ggml blocks (the inverse of GGMLQuant.swift), for writing GGUF files.
//
// These follow ggml's reference `quantize_row_*_ref` (as gguf-py does, bit for bit), per block of 32:
//  Q8_0: d = max|x| / 127, q = round(x / d) (half away from zero).
//  Q4_0: m = the x of largest |x| (first if tied), d = m / −8, q = min(15, trunc(x / d + 8.5)).
//  Q5_0: d = m / −16, q = min(31, trunc(x / d + 16.5)); bit 4 of q goes to qh.
//  Q4_1: d = (max − min) / 15, q = min(15, trunc((x − min) / d + 0.5)), stored m = min.
//  Q5_1: d = (max − min) / 31, q = min(31, trunc((x − min) / d + 0.5)).
// "/ d" is a multiplication by 1/d (0 when d is 0), and d, m are computed in f32 before being stored as f16.

extension GGMLType {
    /// Whether `quantize` handles this type.
    public var canQuantize: Bool {
        switch self {
        case .f32, .f16, .bf16, .q8_0, .q4_0, .q4_1, .q5_0, .q5_1: return true
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
