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

    // The vocabulary-parallel loss (cross_entropy.cu's second part; CUDADecoderTrainer+VocabularyParallelHead.swift).

    /// statistics[3r ..< 3r + 3] = (m, s, t) of row r of a slice's bf16 logits [rows, width] (vocabulary columns
    /// [columnStart, columnStart + width)): the max of the (soft-capped) logits, Σ e^(z − m) merged as the
    /// whole-vocabulary kernel merges, and the target's logit when this slice holds it (else 0). width 0: (−∞, 0, 0).
    public func crossEntropySliceStatistics(logits: CUdeviceptr, labels: CUdeviceptr, rows: Int, width: Int, columnStart: Int,
                                            softcap: Float?, statistics: CUdeviceptr, stream: CUDAStream? = nil) throws {
        try requireSoftcap(softcap)
        try require(width >= 0 && columnStart >= 0, "crossEntropySliceStatistics", "a slice of \(width) columns at \(columnStart)")
        guard rows > 0 else { return }
        try device.launch(compiler.function(KernelSources.crossEntropy, "cross_entropy_slice_statistics"),
                          grid: (rows, 1, 1), block: (512, 1, 1), stream: stream,
                          [.pointer(logits), .pointer(labels), .int(width), .int(columnStart), .float(softcap ?? 0), .pointer(statistics)])
    }

    /// lse[r] for the `rows` gathered rows from every rank's statistics ([worldSize][rows][3]), combined in rank order
    /// (M = max m, S = Σ s·e^(m − M) over the slices with columns, lse = M + log S), and rowLoss[r − lossRows.lowerBound]
    /// = lse − the target's logit from the rank holding it (0 where the label is -100) for the rows `lossRows`.
    public func crossEntropyCombine(statistics: CUdeviceptr, labels: CUdeviceptr, rows: Int, worldSize: Int, vocab: Int,
                                    lse: CUdeviceptr, rowLoss: CUdeviceptr, lossRows: Range<Int>, stream: CUDAStream? = nil) throws {
        try require(worldSize > 0 && vocab > 0 && lossRows.lowerBound >= 0 && lossRows.upperBound <= rows, "crossEntropyCombine",
                    "rows \(lossRows) of \(rows), \(worldSize) ranks, a vocabulary of \(vocab)")
        guard rows > 0 else { return }
        try device.launch(compiler.function(KernelSources.crossEntropy, "cross_entropy_combine"),
                          grid: ((rows + 255) / 256, 1, 1), block: (256, 1, 1), stream: stream,
                          [.pointer(statistics), .pointer(labels), .int(rows), .int(worldSize), .int(vocab), .pointer(lse), .pointer(rowLoss),
                           .int(lossRows.lowerBound), .int(lossRows.count)])
    }

    /// d logits of a slice's bf16 logits [rows, width] in place, given each row's lse: gradScale · (softmax −
    /// onehot) (times the cap's 1 − tanh²), 0 on rows labelled -100: the whole-vocabulary kernel's pass 2.
    public func crossEntropySliceGradient(logits: CUdeviceptr, labels: CUdeviceptr, lse: CUdeviceptr, rows: Int, width: Int,
                                          columnStart: Int, gradScale: Float, softcap: Float?, stream: CUDAStream? = nil) throws {
        try requireSoftcap(softcap)
        guard rows > 0, width > 0 else { return }
        try device.launch(compiler.function(KernelSources.crossEntropy, "cross_entropy_slice_gradient"),
                          grid: (rows, 1, 1), block: (512, 1, 1), stream: stream,
                          [.pointer(logits), .pointer(labels), .pointer(lse), .int(width), .int(columnStart), .float(gradScale),
                           .float(softcap ?? 0)])
    }

    /// A soft-cap is a finite number > 0 (nil: none), for every cross-entropy launch.
    func requireSoftcap(_ softcap: Float?) throws {
        try require(softcap.map { $0.isFinite && $0 > 0 } ?? true, "crossEntropy", "soft-cap \(softcap ?? 0) must be a finite number > 0")
    }

    /// out[0] = sum of rowLoss, out[1] = count of labels that are not -100 (deterministic order).
    public func crossEntropyReduce(rowLoss: DeviceBuffer<Float>, labels: DeviceBuffer<Int32>, rows: Int,
                                   into out: DeviceBuffer<Float>, stream: CUDAStream? = nil) throws {
        try require(rowLoss.count >= rows && labels.count >= rows && out.count >= 2, "crossEntropyReduce", "buffers too small")
        try device.launch(compiler.function(KernelSources.crossEntropy, "cross_entropy_reduce"), grid: (1, 1, 1),
                          block: (1024, 1, 1), stream: stream, [rowLoss.arg, labels.arg, .int(rows), out.arg])
    }
}
