// Element types of stored tensors, and the bf16/f16 conversions every format needs.

/// The element types that safetensors (and our checkpoints) can hold.
public enum DType: String, Sendable, CaseIterable {
    case f32 = "F32"
    case f16 = "F16"
    case bf16 = "BF16"
    case f64 = "F64"
    case u8 = "U8"
    case i8 = "I8"
    case i16 = "I16"
    case i32 = "I32"
    case i64 = "I64"
    case bool = "BOOL"

    /// Bytes per element.
    public var size: Int {
        switch self {
        case .u8, .i8, .bool: return 1
        case .f16, .bf16, .i16: return 2
        case .f32, .i32: return 4
        case .f64, .i64: return 8
        }
    }

    public var isFloatingPoint: Bool {
        switch self {
        case .f32, .f16, .bf16, .f64: return true
        default: return false
        }
    }
}

// MARK: - bf16 and f16 conversions

/// bf16 bits → Float: bf16 is the top half of an IEEE float.
@inline(__always)
public func bf16ToFloat(_ bits: UInt16) -> Float {
    Float(bitPattern: UInt32(bits) << 16)
}

/// Float → bf16 bits with round-to-nearest-even, as PyTorch's `.to(torch.bfloat16)` does.
@inline(__always)
public func floatToBF16(_ value: Float) -> UInt16 {
    let bits = value.bitPattern
    if value.isNaN { return UInt16(truncatingIfNeeded: (bits >> 16) | 0x0040) }
    let roundingBias: UInt32 = 0x7FFF + ((bits >> 16) & 1)
    return UInt16(truncatingIfNeeded: (bits &+ roundingBias) >> 16)
}

/// IEEE half bits → Float.
@inline(__always)
public func f16ToFloat(_ bits: UInt16) -> Float {
    #if arch(x86_64) || arch(arm64)
    return Float(Float16(bitPattern: bits))
    #else
    let sign = UInt32(bits & 0x8000) << 16
    var exponent = Int32((bits >> 10) & 0x1F)
    var mantissa = UInt32(bits & 0x3FF)
    if exponent == 0x1F { return Float(bitPattern: sign | 0x7F80_0000 | (mantissa << 13)) }
    if exponent == 0 {
        if mantissa == 0 { return Float(bitPattern: sign) }
        exponent = 1
        while mantissa & 0x400 == 0 { mantissa <<= 1; exponent -= 1 }
        mantissa &= 0x3FF
    }
    return Float(bitPattern: sign | UInt32(exponent + 112) << 23 | (mantissa << 13))
    #endif
}

/// Float → IEEE half bits, round-to-nearest-even.
@inline(__always)
public func floatToF16(_ value: Float) -> UInt16 {
    Float16(value).bitPattern
}

/// Rounds a Float to the nearest bf16 value and back, the rounding a bf16 store applies.
@inline(__always)
public func roundToBF16(_ value: Float) -> Float { bf16ToFloat(floatToBF16(value)) }

// MARK: - Buffer conversion

/// Converts raw little-endian bytes of `dtype` into Floats. Integer types convert by value.
public func convertToFloat(_ bytes: UnsafeRawBufferPointer, dtype: DType, into out: UnsafeMutableBufferPointer<Float>) {
    let n = out.count
    precondition(bytes.count >= n * dtype.size, "buffer too small for \(n) \(dtype.rawValue) elements")
    switch dtype {
    case .f32:
        for i in 0..<n { out[i] = bytes.loadUnaligned(fromByteOffset: i * 4, as: Float.self) }
    case .bf16:
        for i in 0..<n { out[i] = bf16ToFloat(bytes.loadUnaligned(fromByteOffset: i * 2, as: UInt16.self)) }
    case .f16:
        for i in 0..<n { out[i] = f16ToFloat(bytes.loadUnaligned(fromByteOffset: i * 2, as: UInt16.self)) }
    case .f64:
        for i in 0..<n { out[i] = Float(bytes.loadUnaligned(fromByteOffset: i * 8, as: Double.self)) }
    case .u8, .bool:
        for i in 0..<n { out[i] = Float(bytes[i]) }
    case .i8:
        for i in 0..<n { out[i] = Float(Int8(bitPattern: bytes[i])) }
    case .i16:
        for i in 0..<n { out[i] = Float(bytes.loadUnaligned(fromByteOffset: i * 2, as: Int16.self)) }
    case .i32:
        for i in 0..<n { out[i] = Float(bytes.loadUnaligned(fromByteOffset: i * 4, as: Int32.self)) }
    case .i64:
        for i in 0..<n { out[i] = Float(bytes.loadUnaligned(fromByteOffset: i * 8, as: Int64.self)) }
    }
}

/// Encodes Floats as little-endian bytes of a floating-point `dtype` (f32, f16 or bf16).
public func encodeFloats(_ values: UnsafeBufferPointer<Float>, as dtype: DType) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: values.count * dtype.size)
    out.withUnsafeMutableBytes { raw in
        switch dtype {
        case .f32:
            for (i, v) in values.enumerated() { raw.storeBytes(of: v, toByteOffset: i * 4, as: Float.self) }
        case .bf16:
            for (i, v) in values.enumerated() { raw.storeBytes(of: floatToBF16(v), toByteOffset: i * 2, as: UInt16.self) }
        case .f16:
            for (i, v) in values.enumerated() { raw.storeBytes(of: floatToF16(v), toByteOffset: i * 2, as: UInt16.self) }
        default:
            preconditionFailure("encodeFloats supports f32, f16 and bf16, not \(dtype.rawValue)")
        }
    }
    return out
}
