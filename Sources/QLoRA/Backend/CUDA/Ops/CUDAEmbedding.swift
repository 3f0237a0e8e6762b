// Launcher for Kernels/embedding.cu: token embedding lookup.

extension CUDAContext {
    /// out[t] = table[ids[t]] for `tokens` ids; table is [vocab, dim] bf16. An id outside [0, vocab) gives a zero
    /// row and sets `badIdFlag[0]` to 1 when a flag buffer is given (check it after the stream finishes).
    public func embeddingForward(ids: DeviceBuffer<Int32>, table: DeviceBuffer<UInt16>, into out: DeviceBuffer<UInt16>,
                                 tokens: Int, vocab: Int, dim: Int, badIdFlag: DeviceBuffer<Int32>? = nil,
                                 stream: CUDAStream? = nil) throws {
        try require(ids.count >= tokens && table.count >= vocab * dim && out.count >= tokens * dim, "embeddingForward",
                    "buffers too small for \(tokens) tokens of \(dim) values from a \(vocab)-row table")
        try device.launch(compiler.function(KernelSources.embedding, "embedding_forward"), grid: (tokens, 1, 1),
                          block: (128, 1, 1), stream: stream,
                          [ids.arg, table.arg, out.arg, .int(vocab), .int(dim), .pointer(badIdFlag?.pointer ?? 0)])
    }
}
