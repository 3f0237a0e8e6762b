// Launchers for Kernels/convert.cu: fp32 <-> bf16.

extension CUDAContext {
    /// out = bf16(in), round to nearest even.
    public func convertToBF16(_ input: DeviceBuffer<Float>, into out: DeviceBuffer<UInt16>, count: Int,
                              stream: CUDAStream? = nil) throws {
        try require(input.count >= count && out.count >= count, "convertToBF16", "buffers shorter than \(count)")
        try device.launch(compiler.function(KernelSources.convert, "convert_f32_to_bf16"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream, [input.arg, out.arg, .int64(Int64(count))])
    }

    /// out = float(in).
    public func convertToFloat(_ input: DeviceBuffer<UInt16>, into out: DeviceBuffer<Float>, count: Int,
                               stream: CUDAStream? = nil) throws {
        try require(input.count >= count && out.count >= count, "convertToFloat", "buffers shorter than \(count)")
        try device.launch(compiler.function(KernelSources.convert, "convert_bf16_to_f32"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream, [input.arg, out.arg, .int64(Int64(count))])
    }
}
