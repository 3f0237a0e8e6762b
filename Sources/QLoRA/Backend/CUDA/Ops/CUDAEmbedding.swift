// Launcher for Kernels/embedding.cu: token embedding lookup.

extension CUDAContext {
    /// out[t] = table[ids[t]] for `tokens` ids; table is [vocab, dim] h16. With `scale` (Gemma's √hidden, rounded to
    /// the compute dtype by the caller, as transformers does), out[t] = h16(table[ids[t]] · scale). An id outside
    /// [0, vocab) gives a zero row and sets `badIdFlag[0]` to 1 when a flag buffer is given (check it after the stream
    /// finishes).
    public func embeddingForward(ids: DeviceBuffer<Int32>, table: DeviceBuffer<UInt16>, into out: DeviceBuffer<UInt16>,
                                 tokens: Int, vocab: Int, dim: Int, badIdFlag: DeviceBuffer<Int32>? = nil, scale: Float? = nil,
                                 stream: CUDAStream? = nil) throws {
        try require(ids.count >= tokens && table.count >= vocab * dim && out.count >= tokens * dim, "embeddingForward",
                    "buffers too small for \(tokens) tokens of \(dim) values from a \(vocab)-row table")
        try require(scale?.isFinite ?? true, "embeddingForward", "scale \(scale ?? 0) is not finite")
        guard tokens > 0 else { return }
        var arguments: [KernelArgument] = [ids.arg, table.arg, out.arg, .int(vocab), .int(dim), .pointer(badIdFlag?.pointer ?? 0)]
        if let scale { arguments.append(.float(scale)) }
        try device.launch(compiler.function(KernelSources.embedding, scale == nil ? "embedding_forward" : "embedding_forward_scaled"),
                          grid: (tokens, 1, 1), block: (128, 1, 1), stream: stream, arguments)
    }
}
