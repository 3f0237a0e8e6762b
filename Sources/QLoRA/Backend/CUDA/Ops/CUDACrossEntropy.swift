// Launchers for Kernels/cross_entropy.cu: loss per row, its gradient wrt the logits, and the sum + count; final-logit
// soft-capping (Gemma 2) inside the loss, and on its own for the logits decode samples from.

extension CUDAContext {
    /// For `rows` rows of bf16 logits over `vocab`: rowLoss[r] = logsumexp(z) - z[label] (0 where label is -100),
    /// and, when `dlogits` is given, dlogits = gradScale * (softmax(z) - onehot(label)) in bf16 (0 on ignored rows).
    /// `dlogits` may be `logits` itself, so the gradient overwrites the chunk of logits in place.
    /// With `softcap` c, the loss is over z' = c·tanh(z / c) (fp32 from the h16 logits) and
    /// dlogits = gradScale · (softmax(z') − onehot) · (1 − (z' / c)²).
    public func crossEntropy(logits: DeviceBuffer<UInt16>, labels: DeviceBuffer<Int32>, rows: Int, vocab: Int,
                             gradScale: Float, rowLoss: DeviceBuffer<Float>, dlogits: DeviceBuffer<UInt16>?,
                             softcap: Float? = nil, stream: CUDAStream? = nil) throws {
        try require(logits.count >= rows * vocab && labels.count >= rows && rowLoss.count >= rows
                        && (dlogits?.count ?? Int.max) >= rows * vocab,
                    "crossEntropy", "buffers too small for \(rows) rows of \(vocab) logits")
        try crossEntropyRows(logits: logits.pointer, labels: labels.pointer, rows: rows, vocab: vocab, gradScale: gradScale,
                             rowLoss: rowLoss.pointer, dlogits: dlogits?.pointer ?? 0, softcap: softcap, stream: stream)
    }

    /// x = c·tanh(x / c) in place over `count` fp32 values (the logits decode samples from; Gemma 2's final cap).
    public func applySoftcap(_ x: CUdeviceptr, count: Int, cap: Float, stream: CUDAStream? = nil) throws {
        try softcapLaunch("softcap_f32", x, count: count, cap: cap, stream: stream)
    }

    /// The same over `count` h16 values.
    public func applySoftcapH16(_ x: CUdeviceptr, count: Int, cap: Float, stream: CUDAStream? = nil) throws {
        try softcapLaunch("softcap_h16", x, count: count, cap: cap, stream: stream)
    }

    public func applySoftcap(_ x: DeviceBuffer<Float>, count: Int, cap: Float, stream: CUDAStream? = nil) throws {
        try require(x.count >= count, "applySoftcap", "buffer of \(x.count) values shorter than \(count)")
        try applySoftcap(x.pointer, count: count, cap: cap, stream: stream)
    }

    public func applySoftcap(_ x: DeviceBuffer<UInt16>, count: Int, cap: Float, stream: CUDAStream? = nil) throws {
        try require(x.count >= count, "applySoftcap", "buffer of \(x.count) values shorter than \(count)")
        try applySoftcapH16(x.pointer, count: count, cap: cap, stream: stream)
    }

    private func softcapLaunch(_ kernel: String, _ x: CUdeviceptr, count: Int, cap: Float, stream: CUDAStream?) throws {
        try require(cap.isFinite && cap > 0, "applySoftcap", "cap \(cap) must be a finite number > 0")
        guard count > 0 else { return }
        try device.launch(compiler.function(KernelSources.crossEntropy, kernel), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream, [.pointer(x), .int64(Int64(count)), .float(cap)])
    }

    /// out[0] = sum of rowLoss, out[1] = count of labels that are not -100 (deterministic order).
    public func crossEntropyReduce(rowLoss: DeviceBuffer<Float>, labels: DeviceBuffer<Int32>, rows: Int,
                                   into out: DeviceBuffer<Float>, stream: CUDAStream? = nil) throws {
        try require(rowLoss.count >= rows && labels.count >= rows && out.count >= 2, "crossEntropyReduce", "buffers too small")
        try device.launch(compiler.function(KernelSources.crossEntropy, "cross_entropy_reduce"), grid: (1, 1, 1),
                          block: (1024, 1, 1), stream: stream, [rowLoss.arg, labels.arg, .int(rows), out.arg])
    }
}
