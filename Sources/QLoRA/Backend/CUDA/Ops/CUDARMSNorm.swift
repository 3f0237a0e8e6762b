// Launchers for Kernels/rmsnorm.cu: RMSNorm forward and input gradient (bf16 in and out, fp32 sums).

extension CUDAContext {
    /// y = RMSNorm(x) * weight for `rows` rows of `dim` values (HF LlamaRMSNorm rounding; see rmsnorm.cu).
    public func rmsNormForward(x: DeviceBuffer<UInt16>, weight: DeviceBuffer<UInt16>, into y: DeviceBuffer<UInt16>,
                               rows: Int, dim: Int, eps: Float, stream: CUDAStream? = nil) throws {
        try require(x.count >= rows * dim && y.count >= rows * dim && weight.count >= dim, "rmsNormForward",
                    "buffers too small for \(rows) x \(dim)")
        try device.launch(compiler.function(KernelSources.rmsnorm, "rmsnorm_forward"), grid: (rows, 1, 1),
                          block: (Self.rowThreads(dim), 1, 1), stream: stream,
                          [x.arg, weight.arg, y.arg, .int(dim), .float(eps)])
    }

    /// dx (= or += when `accumulate`) the gradient of RMSNorm wrt its input, given dy.
    public func rmsNormBackward(x: DeviceBuffer<UInt16>, weight: DeviceBuffer<UInt16>, dy: DeviceBuffer<UInt16>,
                                into dx: DeviceBuffer<UInt16>, rows: Int, dim: Int, eps: Float, accumulate: Bool = false,
                                stream: CUDAStream? = nil) throws {
        try require(x.count >= rows * dim && dy.count >= rows * dim && dx.count >= rows * dim && weight.count >= dim,
                    "rmsNormBackward", "buffers too small for \(rows) x \(dim)")
        try device.launch(compiler.function(KernelSources.rmsnorm, "rmsnorm_backward"), grid: (rows, 1, 1),
                          block: (Self.rowThreads(dim), 1, 1), stream: stream,
                          [x.arg, weight.arg, dy.arg, dx.arg, .int(dim), .float(eps), .int(accumulate ? 1 : 0)])
    }

    /// Threads for a one-block-per-row kernel: a multiple of 32, about 8 values per thread, 32...1024.
    static func rowThreads(_ dim: Int) -> Int {
        min(1024, max(32, ((dim / 8) + 31) / 32 * 32))
    }
}
