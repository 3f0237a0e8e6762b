// NF4 dequantization, bitsandbytes layout (formula in Backend/CUDA/Kernels/nf4.cu).

extension CPUReference {
    /// The 16 NF4 code values (bitsandbytes' table), index = 4-bit code.
    public static let nf4Code: [Float] = [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]

    /// absmax[b] = code[quantized[b]] * nested[b / nestedBlocksize] + offset (double quantization undone).
    public static func doubleQuantAbsmax(quantized: [UInt8], code: [Float], nestedAbsmax: [Float], offset: Float,
                                         nestedBlocksize: Int = 256) -> [Float] {
        quantized.indices.map { b in code[Int(quantized[b])] * nestedAbsmax[b / nestedBlocksize] + offset }
    }

    /// `count` values from packed NF4 codes (element 2i in the high nibble of byte i) and per-block absmax.
    public static func nf4Dequantize(packed: [UInt8], absmax: [Float], blocksize: Int = 64, count: Int) -> [Float] {
        (0..<count).map { e in
            let byte = packed[e / 2]
            let nibble = e % 2 == 0 ? byte >> 4 : byte & 15
            return nf4Code[Int(nibble)] * absmax[e / blocksize]
        }
    }
}
