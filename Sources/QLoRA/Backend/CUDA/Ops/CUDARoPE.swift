// Launcher for Kernels/rope.cu: rotary position embedding in place, HF rotate_half convention, with partial rotary
// (Phi-3/Phi-4) and longrope's attention factor.

extension CUDAContext {
    /// Rotates the first `rotaryDim` (default: all) dimensions of each head of x [tokens, heads, headDim] in place by
    /// position, cos and sin times `attentionFactor` (longrope's m; 1 otherwise); the other dimensions pass through.
    /// `backward` applies the transpose m·R(−θ) (the gradient). `inverseFrequencies` has rotaryDim/2 entries (see
    /// `DecoderConfig.ropeInverseFrequencies`).
    public func rope(_ x: DeviceBuffer<UInt16>, positions: DeviceBuffer<Int32>, inverseFrequencies: DeviceBuffer<Float>,
                     tokens: Int, heads: Int, headDim: Int, rotaryDim: Int? = nil, attentionFactor: Float = 1,
                     backward: Bool = false, stream: CUDAStream? = nil) throws {
        let op = "rope"
        let rotated = rotaryDim ?? headDim
        try require(headDim % 2 == 0, op, "head dimension \(headDim) must be even")
        try require(rotated % 2 == 0 && rotated >= 2 && rotated <= headDim, op,
                    "rotary dimension \(rotated) must be even and within 2...\(headDim)")
        try require(attentionFactor.isFinite, op, "attention factor \(attentionFactor) is not finite")
        try require(x.count >= tokens * heads * headDim, op, "x holds \(x.count) values, \(tokens)x\(heads)x\(headDim) needed")
        try require(positions.count >= tokens && inverseFrequencies.count >= rotated / 2, op,
                    "positions (\(positions.count)) or frequencies (\(inverseFrequencies.count)) shorter than \(tokens) and \(rotated / 2)")
        guard tokens > 0 && heads > 0 else { return }
        let half = rotated / 2
        let items = tokens * (half % 2 == 0 ? half / 2 : half)  // a thread per token and frequency pair (see rope.cu)
        try device.launch(compiler.function(KernelSources.rope, "rope_apply_partial"), grid: (gridSize(items: items), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [x.arg, positions.arg, inverseFrequencies.arg, .int(tokens), .int(heads), .int(headDim), .int(rotated),
                           .float(backward ? -1 : 1), .float(attentionFactor)])
    }
}
