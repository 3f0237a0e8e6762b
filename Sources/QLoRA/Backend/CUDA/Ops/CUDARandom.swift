// Launchers for Kernels/random.cu: reproducible random fills made on the device (benchmark weights).

extension CUDAContext {
    /// Fills `count` bytes at `pointer` with random bytes from `seed`.
    public func randomBytes(_ pointer: CUdeviceptr, count: Int, seed: UInt64, stream: CUDAStream? = nil) throws {
        try device.launch(compiler.function(KernelSources.random, "random_bytes"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream, [.pointer(pointer), .int64(Int64(count)), .int64(Int64(bitPattern: seed))])
    }

    /// Fills `count` bf16 values at `pointer` uniformly from [lo, hi).
    public func randomBF16(_ pointer: CUdeviceptr, count: Int, lo: Float, hi: Float, seed: UInt64, stream: CUDAStream? = nil) throws {
        try device.launch(compiler.function(KernelSources.random, "random_bf16"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [.pointer(pointer), .int64(Int64(count)), .float(lo), .float(hi), .int64(Int64(bitPattern: seed))])
    }

    /// Fills `count` floats at `pointer` uniformly from [lo, hi).
    public func randomFloat(_ pointer: CUdeviceptr, count: Int, lo: Float, hi: Float, seed: UInt64, stream: CUDAStream? = nil) throws {
        try device.launch(compiler.function(KernelSources.random, "random_f32"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [.pointer(pointer), .int64(Int64(count)), .float(lo), .float(hi), .int64(Int64(bitPattern: seed))])
    }
}
