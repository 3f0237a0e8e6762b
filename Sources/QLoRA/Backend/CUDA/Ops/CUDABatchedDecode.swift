// Launchers for Kernels/decode_batched.cu: the NF4 small-GEMM of batched generation (X packed into fragment order,
// the tensor-core product, the split-K sum), RoPE + KV-cache append, attention and argmax per row of a step whose
// rows belong to different sequences (each with its own KV-cache slot and position), and a row gather. They take raw
// device addresses, as the batch-1 launchers do; the shape checks of the model are the caller's
// (CUDABatchedInference).

/// One matrix of an `nf4GemmRows` launch (mirrors `struct Nf4GemmTask` in decode_batched.cu):
/// Y[m, :] (+)= W X[m, :] for the rows m of X, Y row m at `out + m · outStride` (bf16 values).
public struct NF4GemmTask {
    public var packed: CUdeviceptr
    public var absmaxCodes: CUdeviceptr
    public var nestedAbsmax: CUdeviceptr
    public var code: CUdeviceptr
    public var offset: Float
    public var rows: Int
    public var columns: Int
    public var blocksize = 64
    public var nestedBlocksize = 256
    public var out: CUdeviceptr
    public var outStride: Int
    public var accumulate: Bool

    public init(packed: CUdeviceptr, absmaxCodes: CUdeviceptr, nestedAbsmax: CUdeviceptr, code: CUdeviceptr, offset: Float, rows: Int,
                columns: Int, out: CUdeviceptr, outStride: Int, accumulate: Bool) {
        self.packed = packed
        self.absmaxCodes = absmaxCodes
        self.nestedAbsmax = nestedAbsmax
        self.code = code
        self.offset = offset
        self.rows = rows
        self.columns = columns
        self.out = out
        self.outStride = outStride
        self.accumulate = accumulate
    }

    /// A task of `weight` (kept alive by its owner while the task is used).
    public init(weight w: CUDANF4Weight, out: CUdeviceptr, outStride: Int, accumulate: Bool) {
        self.init(packed: w.packed.pointer, absmaxCodes: w.absmaxCodes.pointer, nestedAbsmax: w.nestedAbsmax.pointer, code: w.code.pointer,
                  offset: w.offset, rows: w.rows, columns: w.columns, out: out, outStride: outStride, accumulate: accumulate)
        blocksize = w.blocksize
        nestedBlocksize = w.nestedBlocksize
    }

    /// Weight rows one thread block computes (4 warps of 16).
    public static let rowsPerBlock = 64
    static let byteCount = 64
    /// Rows of X one launch takes (8 n-tiles of 8).
    public static let maxRows = 64

    /// The tasks as the kernel reads them, the grid's x size, and ldc (the tasks' rows together: the split-K
    /// partials' row length).
    static func encode(_ tasks: [NF4GemmTask]) -> (bytes: [UInt8], blocks: Int, columns: Int) {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(tasks.count * byteCount)
        func put<T>(_ v: T) { withUnsafeBytes(of: v) { bytes.append(contentsOf: $0) } }
        var first = 0, col0 = 0
        for t in tasks {
            for p in [t.packed, t.absmaxCodes, t.nestedAbsmax, t.code, t.out] { put(p.littleEndian) }
            put(t.offset.bitPattern.littleEndian)
            put(Int32(t.rows).littleEndian)
            put(Int32(t.outStride).littleEndian)
            put(Int32(col0).littleEndian)
            put(Int32(first).littleEndian)
            put(Int32(t.accumulate ? 1 : 0).littleEndian)
            first += (t.rows + rowsPerBlock - 1) / rowsPerBlock
            col0 += t.rows
        }
        return (bytes, first, col0)
    }

    /// The encoded tasks alone (to upload once for `nf4GemmRows`).
    public static func encodedBytes(_ tasks: [NF4GemmTask]) -> [UInt8] { encode(tasks).bytes }

    /// Bytes of the packed X for `rows` rows of `cols` values (rows to a multiple of 8, cols to 128).
    public static func packedBytes(rows: Int, cols: Int) -> Int { (rows + 7) / 8 * 8 * ((cols + 127) / 128 * 128) * 2 }

    /// K splits for a launch of `blocks` blocks over `cols` columns on `sms` multiprocessors: enough blocks for
    /// about 4 per multiprocessor, each split at least 4 k-blocks of 128.
    public static func splits(blocks: Int, cols: Int, sms: Int) -> Int {
        let kblocks = (cols + 127) / 128
        var s = 1
        while blocks * s < 4 * sms && kblocks / (2 * s) >= 4 && s < 16 { s *= 2 }
        return s
    }
}

extension CUDAContext {
    /// Y (+)= W X for each task, X [rows, cols] bf16 at `x` (rows ≤ 64; cols a multiple of 32; 16-byte aligned),
    /// reading each 4-bit weight once for all rows. All tasks' weights have `cols` columns and the same blocksizes.
    /// `packedX` holds at least `NF4GemmTask.packedBytes(rows:cols:)` bytes; with `splits` > 1, `partial` holds
    /// splits · rows · (the tasks' rows together) floats. `encodedTasks` is a device copy of the encoded tasks
    /// (`NF4GemmTask.encode`), made once by callers that launch the same tasks every step.
    public func nf4GemmRows(tasks: [NF4GemmTask], encodedTasks: CUdeviceptr, x: CUdeviceptr, rows: Int, cols: Int, packedX: CUdeviceptr,
                            splits: Int, partial: CUdeviceptr, stream: CUDAStream? = nil) throws {
        let w0 = tasks.first
        try require(!tasks.isEmpty && tasks.count <= 8 && rows >= 1 && rows <= NF4GemmTask.maxRows && cols % 32 == 0 && splits >= 1
                        && tasks.allSatisfy { $0.columns == cols && $0.blocksize == w0!.blocksize && $0.nestedBlocksize == w0!.nestedBlocksize }
                        && w0!.blocksize >= 32 && w0!.blocksize.nonzeroBitCount == 1 && w0!.nestedBlocksize.nonzeroBitCount == 1,
                    "nf4GemmRows",
                    "1...8 tasks of \(cols) columns (a multiple of 32) with one blocksize (a power of two, at least 32), 1...64 rows (got \(rows)), splits ≥ 1")
        let ntiles = (rows + 7) / 8, kblocks = (cols + 127) / 128
        try device.launch(compiler.function(KernelSources.decodeBatched, "nf4_gemm_pack_x"),
                          grid: (gridSize(items: kblocks * ntiles * 128), 1, 1), block: (256, 1, 1), stream: stream,
                          [.pointer(x), .pointer(packedX), .int(rows), .int(cols), .int(ntiles), .int(kblocks)])
        let (_, blocks, columns) = NF4GemmTask.encode(tasks)
        let w = w0!
        try device.launch(compiler.function(KernelSources.decodeBatched, "nf4_gemm_rows_n\(ntiles)"), grid: (blocks, splits, 1),
                          block: (128, 1, 1), stream: stream,
                          [.pointer(encodedTasks), .int(tasks.count), .pointer(packedX), .int(rows), .int(cols),
                           .int(w.blocksize.trailingZeroBitCount), .int(w.nestedBlocksize.trailingZeroBitCount), .pointer(partial),
                           .int(columns)])
        if splits > 1 {
            try device.launch(compiler.function(KernelSources.decodeBatched, "nf4_gemm_finish"),
                              grid: (gridSize(items: rows * columns), 1, 1), block: (256, 1, 1), stream: stream,
                              [.pointer(encodedTasks), .int(tasks.count), .pointer(partial), .int(rows), .int(columns), .int(splits)])
        }
    }

    /// Per row r of `rows`: [RMS-norms each head of q and k with `qNorm`/`kNorm` (nonzero: Qwen3, Gemma 3), then]
    /// rotates the first `rotaryDim` (default all) dimensions of each head of q and k inside the fused row qkv[r] =
    /// [q | k | v] (row stride `stride` values) at positions[r], cos and sin times `ropeScale`, and writes k, v into the
    /// caches ([slots, capacity, kvHeads · headDim]) at (slots[r], positions[r] mod capacity); `slots` 0 means slot 0 for
    /// every row; `kcache` 0: rotates only (a ring layer's step, appended after its attention by kvAppendRows).
    /// `longRows` (Int32 per row, nonzero: longrope's long factors) picks the second half of `inverseFrequencies`
    /// ([2, rotaryDim / 2]: short, then long) for its rows; 0: every row takes the first.
    public func ropeAppendRows(qkv: CUdeviceptr, stride: Int, kcache: CUdeviceptr, vcache: CUdeviceptr, slots: CUdeviceptr,
                               positions: CUdeviceptr, inverseFrequencies: CUdeviceptr, rows: Int, capacity: Int, heads: Int,
                               kvHeads: Int, headDim: Int, rotaryDim: Int? = nil, ropeScale: Float = 1, qNorm: CUdeviceptr = 0,
                               kNorm: CUdeviceptr = 0, normOffset: Float = 0, eps: Float = 0, longRows: CUdeviceptr = 0,
                               stream: CUDAStream? = nil) throws {
        let rotary = rotaryDim ?? headDim
        try require(headDim <= 256 && headDim % 2 == 0 && rotary % 2 == 0 && rotary > 0 && rotary <= headDim && (qNorm == 0) == (kNorm == 0)
                        && capacity > 0 && (kcache == 0) == (vcache == 0),
                    "ropeAppendRows", "head dimension \(headDim) (even, at most 256), rotary dimensions \(rotary) (even, 1...head dim), q and k norms both or neither, capacity \(capacity) positive, both caches or neither")
        guard rows > 0 else { return }
        // A block per 4 heads of a row (rope_append_rows), so a single decode row spreads over several SMs.
        try device.launch(compiler.function(KernelSources.decodeBatched, "rope_append_rows"), grid: (rows, (heads + kvHeads + 3) / 4, 1),
                          block: (128, 1, 1), stream: stream,
                          [.pointer(qkv), .int(stride), .pointer(kcache), .pointer(vcache), .pointer(slots), .pointer(positions),
                           .pointer(inverseFrequencies), .int(rows), .int(capacity), .int(heads), .int(kvHeads), .int(headDim),
                           .int(rotary), .float(ropeScale), .pointer(qNorm), .pointer(kNorm), .float(normOffset), .float(eps),
                           .pointer(longRows)])
    }

    /// out [rows, heads · D]: row r's query (head h at qkv + r · stride + h · D) attends to its slot's keys of positions
    /// 0 ... positions[r] (the last `window` of them when window > 0; `slots` 0: slot 0), position j at cache row j mod
    /// `capacity`. With `runStart` (Int32 per row: the index of the first row of its run, the rows of its sequence in this
    /// step), positions from that row's on are read from the step's rows (a ring layer, whose rows are appended after).
    /// D is 32, 64, 96, 128 or 256. Scores q·k · scale (default D^-½), soft-capped c·tanh(s / c) when softcap > 0.
    public func attentionRows(qkv: CUdeviceptr, stride: Int, kcache: CUdeviceptr, vcache: CUdeviceptr, out: CUdeviceptr,
                              slots: CUdeviceptr, positions: CUdeviceptr, rows: Int, capacity: Int, heads: Int, kvHeads: Int,
                              headDim: Int, scale: Float? = nil, softcap: Float = 0, window: Int = 0, runStart: CUdeviceptr = 0,
                              stream: CUDAStream? = nil) throws {
        try require(Self.decodeHeadDims.contains(headDim) && kvHeads > 0 && heads % kvHeads == 0 && window >= 0 && capacity > 0,
                    "attentionRows", "head dimension \(headDim) (32, 64, 96, 128 or 256), heads \(heads)/\(kvHeads), window \(window) or capacity \(capacity)")
        guard rows > 0 else { return }
        try device.launch(compiler.function(KernelSources.decodeBatched, "attention_rows_d\(headDim)"), grid: (rows, heads, 1),
                          block: (128, 1, 1), stream: stream,
                          [.pointer(qkv), .int(stride), .pointer(kcache), .pointer(vcache), .pointer(out), .pointer(slots),
                           .pointer(positions), .int(capacity), .int(heads), .int(kvHeads),
                           .float(scale ?? 1 / Float(headDim).squareRoot()), .float(softcap), .int(window), .pointer(runStart)])
    }

    /// A ring layer's append after its attention: each row among the last `capacity` of its run (`runEnd`, Int32 per
    /// row: one past the index of its run's last row) writes its k and v (from the fused row [q | k | v], already
    /// rotated by ropeAppendRows) into its slot at positions[r] mod capacity.
    public func kvAppendRows(qkv: CUdeviceptr, stride: Int, kcache: CUdeviceptr, vcache: CUdeviceptr, slots: CUdeviceptr,
                             positions: CUdeviceptr, runEnd: CUdeviceptr, rows: Int, capacity: Int, heads: Int, kvHeads: Int,
                             headDim: Int, stream: CUDAStream? = nil) throws {
        try require(capacity > 0 && kvHeads > 0 && runEnd != 0, "kvAppendRows", "capacity \(capacity), kv heads \(kvHeads), run ends given")
        guard rows > 0 else { return }
        try device.launch(compiler.function(KernelSources.decodeBatched, "kv_append_rows"), grid: (rows, 1, 1),
                          block: (128, 1, 1), stream: stream,
                          [.pointer(qkv), .int(stride), .pointer(kcache), .pointer(vcache), .pointer(slots), .pointer(positions),
                           .pointer(runEnd), .int(rows), .int(capacity), .int(heads), .int(kvHeads), .int(headDim)])
    }

    /// Per row: out = RMSNorm(x)·(weight + offset) as the family rounds it (offset 0: Llama's bf16(bf16(x·r)·w); else
    /// Gemma's bf16(x·r·(w + offset))), or out = bf16(out + that) with `add` (a norm on a branch added to the residual
    /// stream). x and out may be the same rows without `add`.
    public func rmsNormRows(x: CUdeviceptr, weight: CUdeviceptr, out: CUdeviceptr, rows: Int, dim: Int, eps: Float, offset: Float = 0,
                            add: Bool = false, stream: CUDAStream? = nil) throws {
        guard rows > 0 else { return }
        try device.launch(compiler.function(KernelSources.decodeBatched, "rmsnorm_rows"), grid: (rows, 1, 1), block: (256, 1, 1),
                          stream: stream,
                          [.pointer(x), .pointer(weight), .pointer(out), .int(dim), .float(eps), .float(offset), .int(add ? 1 : 0)])
    }

    /// out[t] = table[ids[t]] · scale (bf16 rows of `dim`; scale 1 copies). The ids (Int32) must be in the table.
    public func embeddingRows(ids: CUdeviceptr, table: CUdeviceptr, out: CUdeviceptr, rows: Int, dim: Int, scale: Float = 1,
                              stream: CUDAStream? = nil) throws {
        guard rows > 0 else { return }
        try device.launch(compiler.function(KernelSources.decodeBatched, "embedding_rows"), grid: (rows, 1, 1), block: (128, 1, 1),
                          stream: stream, [.pointer(ids), .pointer(table), .pointer(out), .int(dim), .float(scale)])
    }

    /// logits = cap · tanh(logits / cap) for `count` fp32 values (final-logit soft-capping).
    public func softcapLogits(_ logits: CUdeviceptr, count: Int, cap: Float, stream: CUDAStream? = nil) throws {
        guard count > 0 else { return }
        try device.launch(compiler.function(KernelSources.decodeBatched, "softcap_logits"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream, [.pointer(logits), .int64(Int64(count)), .float(cap)])
    }

    /// out[r] (Int32) = the first index of the largest value of logits row r (fp32 [rows, vocab]).
    public func argmaxRows(logits: CUdeviceptr, out: CUdeviceptr, rows: Int, vocab: Int, stream: CUDAStream? = nil) throws {
        try device.launch(compiler.function(KernelSources.decodeBatched, "argmax_rows"), grid: (rows, 1, 1), block: (256, 1, 1),
                          stream: stream, [.pointer(logits), .pointer(out), .int(vocab)])
    }

    /// dst[i, :] = src[index[i], :] for `rows` rows of `cols` bf16 values.
    public func gatherRows(src: CUdeviceptr, dst: CUdeviceptr, index: CUdeviceptr, rows: Int, cols: Int, stream: CUDAStream? = nil) throws {
        try device.launch(compiler.function(KernelSources.decodeBatched, "gather_rows"), grid: (gridSize(items: rows * cols), 1, 1),
                          block: (256, 1, 1), stream: stream, [.pointer(src), .pointer(dst), .pointer(index), .int(rows), .int(cols)])
    }

    /// y[r · stride + c] (+)= bias[c] for `rows` rows of `cols` values (bias 0: adds nothing, or zeroes with `overwrite`).
    public func addBiasRows(_ bias: CUdeviceptr, to y: CUdeviceptr, stride: Int, rows: Int, cols: Int, overwrite: Bool,
                            stream: CUDAStream? = nil) throws {
        try device.launch(compiler.function(KernelSources.decodeBatched, "add_bias_rows"), grid: (gridSize(items: rows * cols), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [.pointer(y), .int(stride), .pointer(bias), .int(rows), .int(cols), .int(overwrite ? 1 : 0)])
    }

    /// h [rows, inter] = act(gate) · up from fused rows gateUp [rows, 2 · inter] (gate first): SwiGLU (silu) or GeGLU.
    public func swigluRows(gateUp: CUdeviceptr, into h: CUdeviceptr, rows: Int, inter: Int, activation: MLPActivation = .silu,
                           stream: CUDAStream? = nil) throws {
        try device.launch(compiler.function(KernelSources.decodeBatched, "swiglu_rows"), grid: (gridSize(items: rows * inter), 1, 1),
                          block: (256, 1, 1), stream: stream, [.pointer(gateUp), .pointer(h), .int(rows), .int(inter), .int(activation.kernelCode)])
    }

    /// Copies a [rows, cols] bf16 matrix (row stride `srcStride`, default cols: dense) into columns dstColumn ..< dstColumn
    /// + cols of a matrix with row stride `dstStride`.
    public func copyBlock(_ src: CUdeviceptr, to dst: CUdeviceptr, rows: Int, cols: Int, dstStride: Int, dstColumn: Int,
                          srcStride: Int? = nil, stream: CUDAStream? = nil) throws {
        guard rows > 0, cols > 0 else { return }
        try device.launch(compiler.function(KernelSources.decodeBatched, "copy_block"), grid: (gridSize(items: rows * cols), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [.pointer(src), .pointer(dst), .int(rows), .int(cols), .int(dstStride), .int(dstColumn), .int(srcStride ?? cols)])
    }
}
