// Blockwise 8-bit quantization with a dynamic map and one fp32 absmax per block, the storage of
// bitsandbytes' 8-bit optimizer states:
//     absmax[b] = max |x| over block b (blocksize elements; the last block may be shorter)
//     code[i]   = nearest map entry to x[i] / absmax[b]        value ≈ map[code[i]] · absmax[b]
// The optimizer fuses this with its update (AdamW8bit); these standalone forms serve inspection,
// tests and conversion of saved states.

public enum BlockwiseQuantization {
    /// Dequantizes `codes` into `out`: out[i] = map[codes[i]] · absmax[i / blockSize].
    public static func dequantize(_ codes: UnsafeBufferPointer<UInt8>, absmax: UnsafeBufferPointer<Float>,
                                  map: DynamicQuantizationMap, blockSize: Int, into out: UnsafeMutableBufferPointer<Float>) {
        precondition(codes.count == out.count && absmax.count == (codes.count + blockSize - 1) / blockSize)
        map.values.withUnsafeBufferPointer { table in
            for i in 0..<codes.count { out[i] = table[Int(codes[i])] * absmax[i / blockSize] }
        }
    }

    /// Dequantizes a whole buffer.
    public static func dequantize(_ codes: [UInt8], absmax: [Float], map: DynamicQuantizationMap, blockSize: Int) -> [Float] {
        var out = [Float](repeating: 0, count: codes.count)
        codes.withUnsafeBufferPointer { c in
            absmax.withUnsafeBufferPointer { a in
                out.withUnsafeMutableBufferPointer { dequantize(c, absmax: a, map: map, blockSize: blockSize, into: $0) }
            }
        }
        return out
    }

    /// Quantizes `values` block by block: absmax per block, then the optimizer's nearest-code search on x / absmax.
    /// A block of zeros gets absmax 0 (its codes then dequantize to 0 whatever they are).
    public static func quantize(_ values: [Float], map: DynamicQuantizationMap, blockSize: Int) -> (codes: [UInt8], absmax: [Float]) {
        let blocks = (values.count + blockSize - 1) / blockSize
        var codes = [UInt8](repeating: 0, count: values.count)
        var absmax = [Float](repeating: 0, count: blocks)
        for b in 0..<blocks {
            let range = (b * blockSize)..<min(values.count, (b + 1) * blockSize)
            var m: Float = 0
            for i in range { m = max(m, abs(values[i])) }
            absmax[b] = m
            for i in range { codes[i] = map.quantize(values[i] / m) }
        }
        return (codes, absmax)
    }
}
