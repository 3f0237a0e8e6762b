// Launchers for Kernels/training.cu (random benchmark weights, gradient clipping, LoRA dropout, bias rows, column copies
// of fused projections) and pointer-level variants of op launchers that the trainer calls on views into larger
// buffers (a chunk of rows of the cross-entropy).

extension CUDAContext {
    /// Uniform random bytes (NF4 codes of benchmark weights).
    public func fillRandomBytes(_ pointer: CUdeviceptr, count: Int, seed: UInt64, stream: CUDAStream? = nil) throws {
        try device.launch(compiler.function(KernelSources.training, "fill_random_bytes"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream, [.pointer(pointer), .int64(Int64(count)), .int64(Int64(bitPattern: seed))])
    }

    /// Roughly normal bf16 values with standard deviation `std`.
    public func fillRandomBF16(_ pointer: CUdeviceptr, count: Int, seed: UInt64, std: Float, stream: CUDAStream? = nil) throws {
        try device.launch(compiler.function(KernelSources.training, "fill_random_bf16"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [.pointer(pointer), .int64(Int64(count)), .int64(Int64(bitPattern: seed)), .float(std)])
    }

    /// Uniform fp32 values in [lo, hi).
    public func fillRandomUniform(_ pointer: CUdeviceptr, count: Int, seed: UInt64, lo: Float, hi: Float,
                                  stream: CUDAStream? = nil) throws {
        try device.launch(compiler.function(KernelSources.training, "fill_random_uniform"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [.pointer(pointer), .int64(Int64(count)), .int64(Int64(bitPattern: seed)), .float(lo), .float(hi)])
    }

    /// Σ g² of each LoRA tensor t in `tensors` (its `counts[t]` values at element `offsets[t]` of `grads`) into
    /// `squares[t]`, in Double (training.cu's tensor_sum_squares; the twin of `GradientClipping.tensorSquares`, to
    /// summation order). The other entries of `squares` are left as they are.
    public func tensorSumSquares(_ grads: DeviceBuffer<Float>, offsets: DeviceBuffer<Int64>, counts: DeviceBuffer<Int64>,
                                 tensors: Range<Int>, into squares: DeviceBuffer<Double>, stream: CUDAStream? = nil) throws {
        try require(offsets.count == counts.count && squares.count >= counts.count && tensors.upperBound <= counts.count,
                     "tensorSumSquares", "\(counts.count) tensors, \(offsets.count) offsets, \(squares.count) sums, tensors \(tensors)")
        guard !tensors.isEmpty else { return }
        try device.launch(compiler.function(KernelSources.training, "tensor_sum_squares"), grid: (tensors.count, 1, 1), block: (256, 1, 1),
                          stream: stream, [grads.arg, offsets.arg, counts.arg, .int(tensors.lowerBound), squares.arg])
    }

    /// The global norm of `count` per-tensor sums of squares, added in tensor order (`GradientClipping.combine`), and
    /// the clipping coefficient for `maxNorm` (`GradientClipping.coefficient`; `.infinity`: 1): result = [norm, coef].
    public func normFromTensorSquares(_ squares: DeviceBuffer<Double>, count: Int, maxNorm: Double, into result: DeviceBuffer<Double>,
                                      stream: CUDAStream? = nil) throws {
        try require(squares.count >= count && result.count >= 2, "normFromTensorSquares", "buffers too small")
        try device.launch(compiler.function(KernelSources.training, "norm_from_tensor_squares"), grid: (1, 1, 1), block: (32, 1, 1),
                          stream: stream, [squares.arg, .int(count), .double(maxNorm), result.arg])
    }

    /// Multiplies `count` gradients at `pointer` by the coefficient in `result[1]` when it is below 1 (what
    /// `normFromTensorSquares` wrote; a non-finite norm wrote 1, leaving them unchanged).
    public func clipByCoefficient(_ pointer: CUdeviceptr, count: Int, result: DeviceBuffer<Double>, stream: CUDAStream? = nil) throws {
        guard count > 0 else { return }
        try device.launch(compiler.function(KernelSources.training, "clip_by_coefficient"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream, [.pointer(pointer), .int64(Int64(count)), result.arg])
    }

    /// x[i] *= factor for `count` fp32 values (the fp16 path's unscaling of the gradients by 1/S; inf and nan stay
    /// what they are, so the norm after it still shows an overflow).
    public func scaleValues(_ x: DeviceBuffer<Float>, count: Int, by factor: Float, stream: CUDAStream? = nil) throws {
        try require(x.count >= count, "scaleValues", "buffer shorter than \(count)")
        try device.launch(compiler.function(KernelSources.training, "scale_values"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream, [x.arg, .int64(Int64(count)), .float(factor)])
    }

    /// LoRA dropout's input, `out = d(x)`: x[i] / keep where element i survives (Training/DropoutMask.swift with
    /// `seed`), else 0; `count` bf16 values (a [tokens, in] matrix, row-major: element index = token · in + feature).
    public func dropoutApply(x: CUdeviceptr, into out: CUdeviceptr, count: Int, seed: UInt64, keep: Float,
                             stream: CUDAStream? = nil) throws {
        try device.launch(compiler.function(KernelSources.training, "dropout_apply"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [.pointer(x), .pointer(out), .int64(Int64(count)), .int64(Int64(bitPattern: seed)), .float(keep)])
    }

    /// The backward of dropout into an existing gradient: dx[i] += t[i] / keep where element i survives (bf16).
    public func dropoutAddMasked(_ t: CUdeviceptr, into dx: CUdeviceptr, count: Int, seed: UInt64, keep: Float,
                                 stream: CUDAStream? = nil) throws {
        try device.launch(compiler.function(KernelSources.training, "dropout_add_masked"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [.pointer(dx), .pointer(t), .int64(Int64(count)), .int64(Int64(bitPattern: seed)), .float(keep)])
    }

    /// The dropout mask itself, 1 = kept (one byte per element), for checking the GPU hash against the CPU's.
    public func dropoutKeepMask(into out: CUdeviceptr, count: Int, seed: UInt64, keep: Float, stream: CUDAStream? = nil) throws {
        try device.launch(compiler.function(KernelSources.training, "dropout_keep_mask"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [.pointer(out), .int64(Int64(count)), .int64(Int64(bitPattern: seed)), .float(keep)])
    }

    /// y[t, :] (+)= v for `rows` rows of `columns` bf16 values (a linear's bias; `overwrite`: y[t, :] = v).
    public func addRowVector(_ v: CUdeviceptr, to y: CUdeviceptr, rows: Int, columns: Int, overwrite: Bool,
                             stream: CUDAStream? = nil) throws {
        try device.launch(compiler.function(KernelSources.training, "add_row_vector"), grid: (gridSize(items: rows * columns), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [.pointer(y), .pointer(v), .int64(Int64(rows)), .int(columns), .int(overwrite ? 1 : 0)])
    }

    /// The cross-entropy kernel on raw pointers (rows of a chunk): see `crossEntropy`. The gradient overwrites the
    /// logits in place when `withGradient`; `softcap` as `crossEntropy`'s.
    func crossEntropyRows(logits: CUdeviceptr, labels: CUdeviceptr, rows: Int, vocab: Int, gradScale: Float,
                          rowLoss: CUdeviceptr, withGradient: Bool, softcap: Float? = nil, stream: CUDAStream? = nil) throws {
        try crossEntropyRows(logits: logits, labels: labels, rows: rows, vocab: vocab, gradScale: gradScale, rowLoss: rowLoss,
                             dlogits: withGradient ? logits : 0, softcap: softcap, stream: stream)
    }

    /// The launch behind both: `dlogits` 0 for the loss alone.
    func crossEntropyRows(logits: CUdeviceptr, labels: CUdeviceptr, rows: Int, vocab: Int, gradScale: Float,
                          rowLoss: CUdeviceptr, dlogits: CUdeviceptr, softcap: Float?, stream: CUDAStream?) throws {
        try requireSoftcap(softcap)
        guard rows > 0 else { return }
        try device.launch(compiler.function(KernelSources.crossEntropy, "cross_entropy_forward_backward"),
                          grid: (rows, 1, 1), block: (512, 1, 1), stream: stream,
                          [.pointer(logits), .pointer(labels), .int(vocab), .float(gradScale), .pointer(rowLoss),
                           .pointer(dlogits), .float(softcap ?? 0)])
    }

    /// dst[r, c] = src[r, c] for a [rows, columns] block of h16 values between row-major matrices whose rows are
    /// `sourceStride` and `destinationStride` elements apart: the split of a fused projection's output (Phi-3's
    /// q | k | v, gate | up) and the join of the gradients back. The two blocks must not overlap.
    public func copyColumns(from src: CUdeviceptr, sourceStride: Int, to dst: CUdeviceptr, destinationStride: Int, rows: Int,
                            columns: Int, stream: CUDAStream? = nil) throws {
        try require(columns >= 0 && rows >= 0 && columns <= sourceStride && columns <= destinationStride, "copyColumns",
                    "\(columns) columns do not fit rows of \(sourceStride) (source) and \(destinationStride) (destination) values")
        guard rows > 0 && columns > 0 else { return }
        let vectors = columns % 8 == 0 && sourceStride % 8 == 0 && destinationStride % 8 == 0 ? columns / 8 : columns
        try device.launch(compiler.function(KernelSources.training, "copy_columns"), grid: (gridSize(items: rows * vectors), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [.pointer(src), .int64(Int64(sourceStride)), .pointer(dst), .int64(Int64(destinationStride)),
                           .int64(Int64(rows)), .int64(Int64(columns))])
    }

    /// The folded LoRA's tail of a weight scratch (training.cu's lora_fold_tail): columns in … in+width−1 of each of
    /// `out` rows `ld` apart get h16(scale·B) at tail columns first … first+r−1 (B [out, r] fp32) and zeros elsewhere.
    public func loraFoldTail(b: CUdeviceptr, scale: Float, into w: CUdeviceptr, out: Int, in inFeatures: Int, ld: Int, width: Int,
                             first: Int, rank: Int, stream: CUDAStream? = nil) throws {
        try require(out >= 0 && inFeatures >= 0 && width >= 0 && first >= 0 && rank >= 0 && first + rank <= width && ld >= inFeatures + width
                        && width <= Int(Int32.max) && inFeatures <= Int(Int32.max), "loraFoldTail",
                    "tail of \(width) columns (rank \(rank) from \(first)) past \(inFeatures) in rows \(ld) apart")
        guard out > 0, width > 0 else { return }
        try device.launch(compiler.function(KernelSources.training, "lora_fold_tail"), grid: (gridSize(items: out * width), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [.pointer(b), .float(scale), .pointer(w), .int(out), .int(inFeatures), .int64(Int64(ld)), .int(width),
                           .int(first), .int(rank)])
    }
}
