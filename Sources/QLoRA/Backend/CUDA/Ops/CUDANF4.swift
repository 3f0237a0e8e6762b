// Launchers for Kernels/nf4.cu: NF4 (+ double-quant) dequantization to bf16, and to fp32 with the CPU's rounding
// (the GPU merge). Layout and formula: see nf4.cu.

/// Where the per-block scales of an NF4 tensor come from.
public enum NF4Scales {
    /// One fp32 absmax per block.
    case float32(absmax: DeviceBuffer<Float>)
    /// Double quantization: absmax[b] = code[quantized[b]] * nestedAbsmax[b / nestedBlocksize] + offset.
    case doubleQuant(quantized: DeviceBuffer<UInt8>, code: DeviceBuffer<Float>, nestedAbsmax: DeviceBuffer<Float>,
                     offset: Float, nestedBlocksize: Int)
}

extension CUDAContext {
    /// Dequantizes `count` NF4 values (`packed`: two per byte, first in the high nibble) into bf16 `out`.
    public func nf4Dequantize(packed: DeviceBuffer<UInt8>, scales: NF4Scales, blocksize: Int = 64, count: Int,
                              into out: DeviceBuffer<UInt16>, stream: CUDAStream? = nil) throws {
        let op = "nf4Dequantize"
        let blocks = (count + blocksize - 1) / blocksize
        try require(blocksize > 0 && blocksize % 8 == 0, op, "blocksize \(blocksize) must be a positive multiple of 8")
        try require(packed.count >= (count + 1) / 2, op, "packed holds \(packed.count) bytes, \(count) values need \((count + 1) / 2)")
        try require(out.count >= count, op, "output holds \(out.count) values, \(count) needed")
        let grid = gridSize(items: (count + 7) / 8)
        switch scales {
        case .float32(let absmax):
            try require(absmax.count >= blocks, op, "absmax holds \(absmax.count) scales, \(blocks) blocks need one each")
            try device.launch(compiler.function(KernelSources.nf4, "nf4_dequantize"), grid: (grid, 1, 1), block: (256, 1, 1),
                              stream: stream, [packed.arg, absmax.arg, .int(blocksize), out.arg, .int64(Int64(count))])
        case let .doubleQuant(quantized, code, nestedAbsmax, offset, nestedBlocksize):
            try require(quantized.count >= blocks, op, "quantized absmax holds \(quantized.count) codes, \(blocks) needed")
            try require(code.count == 256, op, "the absmax code map must have 256 entries, not \(code.count)")
            try require(nestedBlocksize > 0 && nestedAbsmax.count >= (blocks + nestedBlocksize - 1) / nestedBlocksize, op,
                        "nested absmax holds \(nestedAbsmax.count) scales for \(blocks) blocks in groups of \(nestedBlocksize)")
            try device.launch(compiler.function(KernelSources.nf4, "nf4_dequantize_double_quant"), grid: (grid, 1, 1),
                              block: (256, 1, 1), stream: stream,
                              [packed.arg, quantized.arg, code.arg, nestedAbsmax.arg, .float(offset), .int(blocksize),
                               .int(nestedBlocksize), out.arg, .int64(Int64(count))])
        }
    }

    /// Dequantizes `count` NF4 values with double-quantized absmax into fp32 `out`, rounding as the CPU does
    /// (`QuantizedWeight.dequantize()`: separate fp32 multiply and add, no fused multiply-add), so the values are the
    /// CPU's bit for bit. With `roundingToBF16` each value is rounded to the nearest bf16 (staying fp32), as the CPU
    /// does for a weight whose dtype is bf16.
    public func nf4DequantizeFloat(packed: DeviceBuffer<UInt8>, quantized: DeviceBuffer<UInt8>, code: DeviceBuffer<Float>,
                                   nestedAbsmax: DeviceBuffer<Float>, offset: Float, blocksize: Int = 64, nestedBlocksize: Int = 256,
                                   roundingToBF16: Bool = false, count: Int, into out: DeviceBuffer<Float>,
                                   stream: CUDAStream? = nil) throws {
        let op = "nf4DequantizeFloat"
        let blocks = (count + blocksize - 1) / blocksize
        try require(blocksize > 0, op, "blocksize \(blocksize) must be positive")
        try require(packed.count >= (count + 1) / 2, op, "packed holds \(packed.count) bytes, \(count) values need \((count + 1) / 2)")
        try require(out.count >= count, op, "output holds \(out.count) values, \(count) needed")
        try require(quantized.count >= blocks, op, "quantized absmax holds \(quantized.count) codes, \(blocks) needed")
        try require(code.count == 256, op, "the absmax code map must have 256 entries, not \(code.count)")
        try require(nestedBlocksize > 0 && nestedAbsmax.count >= (blocks + nestedBlocksize - 1) / nestedBlocksize, op,
                    "nested absmax holds \(nestedAbsmax.count) scales for \(blocks) blocks in groups of \(nestedBlocksize)")
        try device.launch(compiler.function(KernelSources.nf4, "nf4_dequantize_double_quant_f32"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [packed.arg, quantized.arg, code.arg, nestedAbsmax.arg, .float(offset), .int(blocksize),
                           .int(nestedBlocksize), .int(roundingToBF16 ? 1 : 0), out.arg, .int64(Int64(count))])
    }
}
