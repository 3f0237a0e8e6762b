// Double quantization of the 4-bit absmax constants (QLoRA §3, bitsandbytes quantize_4bit with
// compress_statistics=True):
//
//   offset          = mean(absmax)                       fp32, torch's CUDA mean: sum * fp32(1 / n)
//   centered[b]     = absmax[b] - offset                 fp32
//   (q, nested)     = quantize_blockwise(centered, code = create_dynamic_map(signed=True), blocksize=256)
//   absmax'[b]      = code[q[b]] * nested[b / 256] + offset      (dequantize_blockwise, then += offset)
//
// Stored per weight: `absmax` (U8 codes), `nested_absmax` (F32, one per 256 blocks), `nested_quant_map`
// (the 256-entry code) and the offset in the quant-state JSON (`nested_offset`).
//
// On the mean: torch reduces on the GPU in its own order; our sum is accumulated in double and rounded
// once to fp32, then multiplied by fp32(1/n) as torch's MeanOps does. This equals every offset in the
// reference fixtures; for very long absmax vectors (10^5 blocks and more) the GPU's fp32 partial sums
// can round differently in the last bit.

/// The double-quantized form of a 4-bit weight's absmax vector.
public struct DoubleQuantizedAbsmax: Sendable, Equatable {
    /// One 8-bit code per 4-bit block.
    public var codes: [UInt8]
    /// One fp32 absmax per `blocksize` codes.
    public var nestedAbsmax: [Float]
    /// The mean that was subtracted before quantizing.
    public var offset: Float
    /// The 8-bit code map (bitsandbytes' signed dynamic map when we quantize).
    public var code: [Float]
    /// Codes per nested block (256 in bitsandbytes).
    public var blocksize: Int

    public init(codes: [UInt8], nestedAbsmax: [Float], offset: Float, code: [Float], blocksize: Int) {
        self.codes = codes
        self.nestedAbsmax = nestedAbsmax
        self.offset = offset
        self.code = code
        self.blocksize = blocksize
    }

    /// The signed dynamic map, computed once.
    public static let signedDynamicMap: [Float] = createDynamicMap(signed: true)

    /// Double-quantizes `absmax` as bitsandbytes does.
    public init(quantizing absmax: [Float], blocksize: Int = 256) {
        let offset = torchCUDAMean(absmax)
        let centered = absmax.map { $0 - offset }
        let q = centered.withUnsafeBufferPointer { quantize8Bit($0, code: Self.signedDynamicMap, blocksize: blocksize) }
        self.init(codes: q.codes, nestedAbsmax: q.absmax, offset: offset, code: Self.signedDynamicMap, blocksize: blocksize)
    }

    /// The fp32 absmax the 4-bit dequantization uses: code[q] * nested + offset.
    public func dequantize() -> [Float] {
        var out = [Float](repeating: 0, count: codes.count)
        for i in codes.indices {
            out[i] = code[Int(codes[i])] * nestedAbsmax[i / blocksize] + offset
        }
        return out
    }
}

/// fp32 mean as torch computes it on CUDA for the absmax vector: fp32(sum) * fp32(1 / n).
func torchCUDAMean(_ values: [Float]) -> Float {
    guard !values.isEmpty else { return .nan }
    var sum = 0.0
    for v in values { sum += Double(v) }
    let factor: Float = 1 / Float(values.count)
    return Float(sum) * factor
}
