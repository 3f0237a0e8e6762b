// Launchers for Kernels/cross_entropy.cu: loss per row, its gradient wrt the logits, and the sum + count.

extension CUDAContext {
    /// For `rows` rows of bf16 logits over `vocab`: rowLoss[r] = logsumexp(z) - z[label] (0 where label is -100),
    /// and, when `dlogits` is given, dlogits = gradScale * (softmax(z) - onehot(label)) in bf16 (0 on ignored rows).
    /// `dlogits` may be `logits` itself, so the gradient overwrites the chunk of logits in place.
    public func crossEntropy(logits: DeviceBuffer<UInt16>, labels: DeviceBuffer<Int32>, rows: Int, vocab: Int,
                             gradScale: Float, rowLoss: DeviceBuffer<Float>, dlogits: DeviceBuffer<UInt16>?,
                             stream: CUDAStream? = nil) throws {
        try require(logits.count >= rows * vocab && labels.count >= rows && rowLoss.count >= rows
                        && (dlogits?.count ?? Int.max) >= rows * vocab,
                    "crossEntropy", "buffers too small for \(rows) rows of \(vocab) logits")
        try device.launch(compiler.function(KernelSources.crossEntropy, "cross_entropy_forward_backward"),
                          grid: (rows, 1, 1), block: (512, 1, 1), stream: stream,
                          [logits.arg, labels.arg, .int(vocab), .float(gradScale), rowLoss.arg,
                           .pointer(dlogits?.pointer ?? 0)])
    }

    /// out[0] = sum of rowLoss, out[1] = count of labels that are not -100 (deterministic order).
    public func crossEntropyReduce(rowLoss: DeviceBuffer<Float>, labels: DeviceBuffer<Int32>, rows: Int,
                                   into out: DeviceBuffer<Float>, stream: CUDAStream? = nil) throws {
        try require(rowLoss.count >= rows && labels.count >= rows && out.count >= 2, "crossEntropyReduce", "buffers too small")
        try device.launch(compiler.function(KernelSources.crossEntropy, "cross_entropy_reduce"), grid: (1, 1, 1),
                          block: (1024, 1, 1), stream: stream, [rowLoss.arg, labels.arg, .int(rows), out.arg])
    }
}
