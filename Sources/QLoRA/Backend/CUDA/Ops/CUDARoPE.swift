// Launcher for Kernels/rope.cu: rotary position embedding in place, HF rotate_half convention.

extension CUDAContext {
    /// Rotates x [tokens, heads, headDim] in place by position; `backward` applies the inverse rotation
    /// (the gradient). `inverseFrequencies` has headDim/2 entries (see `CPUReference.ropeInverseFrequencies`).
    public func rope(_ x: DeviceBuffer<UInt16>, positions: DeviceBuffer<Int32>, inverseFrequencies: DeviceBuffer<Float>,
                     tokens: Int, heads: Int, headDim: Int, backward: Bool = false, stream: CUDAStream? = nil) throws {
        let op = "rope"
        try require(headDim % 2 == 0, op, "head dimension \(headDim) must be even")
        try require(x.count >= tokens * heads * headDim, op, "x holds \(x.count) values, \(tokens)x\(heads)x\(headDim) needed")
        try require(positions.count >= tokens && inverseFrequencies.count >= headDim / 2, op, "positions or frequencies too short")
        let items = tokens * headDim / 2  // one thread per (token, frequency), looping over heads
        try device.launch(compiler.function(KernelSources.rope, "rope_apply"), grid: (gridSize(items: items), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [x.arg, positions.arg, inverseFrequencies.arg, .int(tokens), .int(heads), .int(headDim),
                           .float(backward ? -1 : 1)])
    }
}
