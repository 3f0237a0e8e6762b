// A 4-bit quantized weight matrix as bitsandbytes stores it (Params4bit + QuantState):
//
//   packed   (n + 1) / 2 bytes: the row-major flatten of [out, in], two codes per byte, first in the high nibble
//   scales   fp32 absmax per block of `blocksize` elements, or its double-quantized form
//   shape    [out, in] (any shape is allowed; rows are over the first dimension)
//
// Blocks run over the flatten, so a block may span rows when `in` is not a multiple of the block size.

/// The absmax constants of a 4-bit weight: plain fp32, or double-quantized.
public enum QuantizationScales: Sendable, Equatable {
    case plain([Float])
    case doubleQuantized(DoubleQuantizedAbsmax)

    /// The fp32 absmax per block that dequantization multiplies by.
    public func absmax() -> [Float] {
        switch self {
        case .plain(let a): return a
        case .doubleQuantized(let d): return d.dequantize()
        }
    }

    public var blockCount: Int {
        switch self {
        case .plain(let a): return a.count
        case .doubleQuantized(let d): return d.codes.count
        }
    }
}

/// A 4-bit (NF4 or FP4) weight with its quantization state.
public struct QuantizedWeight: Sendable, Equatable {
    public let quantType: QuantType
    public let blocksize: Int
    /// The dense tensor's shape, usually [out, in].
    public let shape: [Int]
    /// The dtype the weight had before quantization (the quant state's `dtype`: what dequantization returns).
    public let dtype: DType
    public let packed: [UInt8]
    public let scales: QuantizationScales
    /// fp32 absmax per block (dequantized once from `scales`), used by `dequantize` and `dequantizeRows`.
    public let absmax: [Float]

    public var elementCount: Int { shape.reduce(1, *) }

    /// Wraps stored parts; checks that their sizes agree.
    public init(quantType: QuantType, blocksize: Int, shape: [Int], dtype: DType, packed: [UInt8], scales: QuantizationScales) throws {
        guard let n = checkedElementCount(shape) else {
            throw UsageError("shape \(shape) is not a valid tensor shape (negative or too large)")
        }
        guard supported4BitBlocksizes.contains(blocksize) else {
            throw UsageError("4-bit blocksize \(blocksize) is not one of \(supported4BitBlocksizes.sorted())")
        }
        guard packed.count == (n + 1) / 2 else {
            throw UsageError("shape \(shape) needs \((n + 1) / 2) packed bytes, got \(packed.count)")
        }
        let blocks = (n + blocksize - 1) / blocksize
        guard scales.blockCount == blocks else {
            throw UsageError("shape \(shape) at blocksize \(blocksize) has \(blocks) blocks, but there are \(scales.blockCount) absmax values")
        }
        if case .doubleQuantized(let d) = scales {
            guard d.blocksize > 0, d.nestedAbsmax.count == (blocks + d.blocksize - 1) / d.blocksize else {
                throw UsageError("\(blocks) absmax codes at nested blocksize \(d.blocksize) need \((blocks + max(d.blocksize, 1) - 1) / max(d.blocksize, 1)) nested absmax values, got \(d.nestedAbsmax.count)")
            }
            guard d.code.count == 256 else { throw UsageError("the nested quant map has \(d.code.count) entries, expected 256") }
        }
        self.quantType = quantType
        self.blocksize = blocksize
        self.shape = shape
        self.dtype = dtype
        self.packed = packed
        self.scales = scales
        self.absmax = scales.absmax()
    }

    /// Quantizes a dense weight (row-major values) as `bitsandbytes.functional.quantize_4bit` does,
    /// with `doubleQuant` as `compress_statistics` (nested blocksize 256).
    public static func quantize(
        _ values: UnsafeBufferPointer<Float>, shape: [Int], type: QuantType = .nf4, blocksize: Int = 64,
        doubleQuant: Bool = true, dtype: DType = .f32
    ) throws -> QuantizedWeight {
        guard shape.reduce(1, *) == values.count else {
            throw UsageError("shape \(shape) has \(shape.reduce(1, *)) elements, got \(values.count) values")
        }
        guard supported4BitBlocksizes.contains(blocksize) else {
            throw UsageError("4-bit blocksize \(blocksize) is not one of \(supported4BitBlocksizes.sorted())")
        }
        let q = quantize4Bit(values, blocksize: blocksize, type: type)
        let scales: QuantizationScales = doubleQuant ? .doubleQuantized(DoubleQuantizedAbsmax(quantizing: q.absmax)) : .plain(q.absmax)
        return try QuantizedWeight(quantType: type, blocksize: blocksize, shape: shape, dtype: dtype, packed: q.packed, scales: scales)
    }

    public static func quantize(
        _ values: [Float], shape: [Int], type: QuantType = .nf4, blocksize: Int = 64, doubleQuant: Bool = true, dtype: DType = .f32
    ) throws -> QuantizedWeight {
        try values.withUnsafeBufferPointer { try quantize($0, shape: shape, type: type, blocksize: blocksize, doubleQuant: doubleQuant, dtype: dtype) }
    }

    /// All elements, as bitsandbytes' `dequantize_4bit` returns them: codebook[code] * absmax in fp32,
    /// rounded to the weight's dtype (`dtype`, the quant state's) when that is bf16 or f16, as the
    /// CUDA kernel stores its fp32 product into a bf16/f16 output. Returned as Float either way.
    public func dequantize() -> [Float] {
        var out = [Float](repeating: 0, count: elementCount)
        out.withUnsafeMutableBufferPointer { dequantizeElements(first: 0, count: elementCount, into: $0) }
        return out
    }

    /// Rows `rows` of the [out, in] matrix (over the first dimension) into `out`, which must hold
    /// `rows.count * (elementCount / shape[0])` floats. Values as `dequantize()` gives them.
    public func dequantizeRows(_ rows: Range<Int>, into out: UnsafeMutableBufferPointer<Float>) {
        let rowCount = shape.first ?? 1
        precondition(rows.lowerBound >= 0 && rows.upperBound <= rowCount, "rows \(rows) out of 0..<\(rowCount)")
        let rowLength = rowCount == 0 ? 0 : elementCount / rowCount
        dequantizeElements(first: rows.lowerBound * rowLength, count: rows.count * rowLength, into: out)
    }

    /// Elements first ..< first + count of the row-major flatten into `out`.
    public func dequantizeElements(first: Int, count: Int, into out: UnsafeMutableBufferPointer<Float>) {
        precondition(first >= 0 && first + count <= elementCount && out.count >= count, "element range out of bounds")
        guard count > 0, let o = out.baseAddress else { return }
        packed.withUnsafeBufferPointer { p in
            absmax.withUnsafeBufferPointer { a in
                dequantize4Bit(packed: p, absmax: a, blocksize: blocksize, type: quantType, first: first, count: count, into: o)
            }
        }
        // The kernel writes its fp32 product into the output dtype (round to nearest even).
        switch dtype {
        case .bf16: for i in 0..<count { o[i] = roundToBF16(o[i]) }
        case .f16: for i in 0..<count { o[i] = f16ToFloat(floatToF16(o[i])) }
        default: break
        }
    }

    // MARK: - Size

    /// Bytes stored for this weight in a bitsandbytes checkpoint: packed codes, absmax (U8 codes or F32),
    /// nested absmax and the two code maps (F32). The quant-state JSON (about 170 bytes) is left out.
    public var storedByteCount: Int {
        var bytes = packed.count + 16 * 4
        switch scales {
        case .plain(let a): bytes += a.count * 4
        case .doubleQuantized(let d): bytes += d.codes.count + d.nestedAbsmax.count * 4 + d.code.count * 4
        }
        return bytes
    }

    /// Bits per parameter from the stored bytes (about 4.127 for NF4 with double quantization at 64/256).
    public var bitsPerParameter: Double {
        elementCount == 0 ? 0 : Double(storedByteCount * 8) / Double(elementCount)
    }
}

/// The product of `shape`, or nil when a dimension is negative or the product overflows.
func checkedElementCount(_ shape: [Int]) -> Int? {
    var n = 1
    for d in shape {
        guard d >= 0 else { return nil }
        let (product, overflow) = n.multipliedReportingOverflow(by: d)
        guard !overflow, product <= Int(Int32.max) * 1024 else { return nil }
        n = product
    }
    return n
}

/// Bits per parameter of a set of quantized weights: total stored bits over total elements.
public func bitsPerParameter(_ weights: [QuantizedWeight]) -> Double {
    let bytes = weights.reduce(0) { $0 + $1.storedByteCount }
    let elements = weights.reduce(0) { $0 + $1.elementCount }
    return elements == 0 ? 0 : Double(bytes * 8) / Double(elements)
}
