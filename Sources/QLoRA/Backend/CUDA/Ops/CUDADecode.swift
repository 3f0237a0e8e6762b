#if canImport(Glibc)
import Glibc
#endif

// Launchers for Kernels/decode.cu: the fused NF4 GEMVs (rows, split-K, tensor cores, and the tensor-core one with its input op
// and LoRA A product in the same launch), the bf16 GEMV and attention over the KV cache. They take raw device addresses, since generation works on rows inside larger
// buffers (the KV cache, the fused q|k|v row); the shape checks are the caller's (CUDAInference).

/// One matrix of an `nf4Gemv` launch (mirrors `struct Nf4GemvTask` in decode.cu): out = W x (+ s B xa) (+ residual).
public struct NF4GemvTask {
    public var packed: CUdeviceptr
    public var absmaxCodes: CUdeviceptr
    public var nestedAbsmax: CUdeviceptr
    public var code: CUdeviceptr
    public var loraB: CUdeviceptr = 0
    public var xa: CUdeviceptr = 0
    public var out: CUdeviceptr
    public var residual: CUdeviceptr = 0
    public var offset: Float
    public var loraScale: Float = 0
    public var rows: Int
    public var rank: Int = 0

    /// Rows one thread block computes (4 warps of 4 rows).
    public static let rowsPerBlock = 16
    static let byteCount = 88

    /// Column splits of nf4_gemv_splitk for a row of `cols` values: about 32+ chunks of 32 values per warp.
    public static func splits(cols: Int) -> Int {
        let chunks = cols / 32
        return chunks >= 256 ? 8 : chunks >= 128 ? 4 : chunks >= 64 ? 2 : 1
    }

    /// Rows per block of nf4_gemv_splitk: 8 warps, `splits` of them per group of 4 rows.
    public static func splitKRowsPerBlock(_ splits: Int) -> Int { 4 * (8 / splits) }

    public init(packed: CUdeviceptr, absmaxCodes: CUdeviceptr, nestedAbsmax: CUdeviceptr, code: CUdeviceptr, offset: Float,
                rows: Int, out: CUdeviceptr) {
        self.packed = packed
        self.absmaxCodes = absmaxCodes
        self.nestedAbsmax = nestedAbsmax
        self.code = code
        self.offset = offset
        self.rows = rows
        self.out = out
    }

    /// The tasks as the kernel reads them (with each task's first block), and the grid size, for blocks of
    /// `rowsPerBlock` rows (`rowsPerBlock` for nf4_gemv, `splitKRowsPerBlock(splits)` for nf4_gemv_splitk).
    public static func encode(_ tasks: [NF4GemvTask], rowsPerBlock: Int = NF4GemvTask.rowsPerBlock) -> (bytes: [UInt8], blocks: Int) {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(tasks.count * byteCount)
        func put<T>(_ v: T) { withUnsafeBytes(of: v) { bytes.append(contentsOf: $0) } }
        var first = 0
        for t in tasks {
            for p in [t.packed, t.absmaxCodes, t.nestedAbsmax, t.code, t.loraB, t.xa, t.out, t.residual] { put(p.littleEndian) }
            put(t.offset.bitPattern.littleEndian)
            put(t.loraScale.bitPattern.littleEndian)
            put(Int32(t.rows).littleEndian)
            put(Int32(t.rank).littleEndian)
            put(Int32(first).littleEndian)
            put(Int32(0))
            first += (t.rows + rowsPerBlock - 1) / rowsPerBlock
        }
        return (bytes, first)
    }
}

extension MLPActivation {
    /// The `activation` argument of the generation kernels (gated_activation in decode.cu and decode_batched.cu).
    var kernelCode: Int { self == .geluTanh ? 1 : 0 }
}

extension CUDAContext {
    /// Runs the encoded `tasks` (a device copy of `NF4GemvTask.encode`'s bytes) over x (bf16, `cols` values,
    /// 16-byte aligned). cols and blocksize must be multiples of 32.
    public func nf4Gemv(tasks: CUdeviceptr, taskCount: Int, blocks: Int, x: CUdeviceptr, cols: Int, blocksize: Int = 64,
                        nestedBlocksize: Int = 256, stream: CUDAStream? = nil) throws {
        try require(cols % 32 == 0 && blocksize >= 32 && blocksize.nonzeroBitCount == 1 && nestedBlocksize.nonzeroBitCount == 1
                        && taskCount >= 1 && taskCount <= 8, "nf4Gemv",
                    "cols \(cols) must be a multiple of 32, blocksizes \(blocksize)/\(nestedBlocksize) powers of two (at least 32), 1...8 tasks (got \(taskCount))")
        let f = try compiler.function(KernelSources.decode, "nf4_gemv")
        let shared = cols * 2
        try allowSharedMemory(f, bytes: shared, "nf4Gemv")
        try device.launch(f, grid: (blocks, 1, 1), block: (128, 1, 1), sharedMemory: shared, stream: stream,
                          [.pointer(tasks), .int(taskCount), .pointer(x), .int(cols), .int(blocksize.trailingZeroBitCount),
                           .int(nestedBlocksize.trailingZeroBitCount)])
    }

    /// nf4Gemv on the tensor cores (nf4_gemv_mma: two codes per table load, mma.sync with fp32 sums, the absmax applied
    /// per 64-value group): the same tasks and grid (`NF4GemvTask.encode(tasks)`, 16 rows per block), 256 threads and
    /// 66 KiB of shared memory per block. Only where `nf4GemvMMASupported` says so.
    public func nf4GemvMMA(tasks: CUdeviceptr, taskCount: Int, blocks: Int, x: CUdeviceptr, cols: Int, blocksize: Int = 64,
                           nestedBlocksize: Int = 256, stream: CUDAStream? = nil) throws {
        try require(nf4GemvMMASupported(cols: cols, blocksize: blocksize) && nestedBlocksize.nonzeroBitCount == 1
                        && taskCount >= 1 && taskCount <= 8, "nf4GemvMMA",
                    "cols \(cols) must be a multiple of 64, blocksize \(blocksize) a power of two of at least 64, nested blocksize \(nestedBlocksize) a power of two, 1...8 tasks (got \(taskCount)), and bf16 needs sm_80 or newer")
        let f = try compiler.function(KernelSources.decode, "nf4_gemv_mma")
        let shared = Self.nf4GemvMMASharedBytes
        try allowSharedMemory(f, bytes: shared, "nf4GemvMMA")
        try device.launch(f, grid: (blocks, 1, 1), block: (256, 1, 1), sharedMemory: shared, stream: stream,
                          [.pointer(tasks), .int(taskCount), .pointer(x), .int(cols), .int(blocksize.trailingZeroBitCount),
                           .int(nestedBlocksize.trailingZeroBitCount)])
    }

    /// GEMV_MMA_SHARED in decode.cu: the replicated pair table (64 KiB), the absmax code map, the pairs, 8 × 16 partial sums.
    static let nf4GemvMMASharedBytes = 256 * 256 + 512 * 4 + 8 * 16 * 4

    /// Whether nf4_gemv_mma runs this shape here: cols a multiple of 64, blocksize a power of two ≥ 64, tensor cores
    /// for the compute type (bf16 mma needs sm_80) and 66 KiB of shared memory per block (Turing has 64).
    public func nf4GemvMMASupported(cols: Int, blocksize: Int) -> Bool {
        cols > 0 && cols % 64 == 0 && blocksize >= 64 && blocksize.nonzeroBitCount == 1
            && (computeDType == .fp16 || compiler.target.major >= 8)
            && Self.nf4GemvMMASharedBytes <= compiler.maxSharedMemoryPerBlock
    }

    /// out[r] = scale · W[r, :] · x for bf16 W [rows, cols] (cols a multiple of 8) and x; fp32 out.
    public func bf16Gemv(weight: CUdeviceptr, x: CUdeviceptr, out: CUdeviceptr, rows: Int, cols: Int, scale: Float = 1,
                         stream: CUDAStream? = nil) throws {
        try require(cols % 8 == 0, "bf16Gemv", "cols \(cols) must be a multiple of 8")
        try device.launch(compiler.function(KernelSources.decode, "bf16_gemv"), grid: ((rows + 15) / 16, 1, 1),
                          block: (128, 1, 1), stream: stream,
                          [.pointer(weight), .pointer(x), .pointer(out), .int(rows), .int(cols), .float(scale)])
    }

    /// Queries [tokens, heads, D] (row stride `qStride` values) at positions start + i attend to the keys of positions
    /// 0 ... start + i (the last `window` of them when window > 0), position j at cache row j mod `ring` (a sliding
    /// layer's ring of its window's rows; nil: `maxKeys`, the cache holds every position). `start` is read from
    /// `startPointer` (Int32) when that is not 0. `maxKeys` bounds start + tokens (it sizes shared memory). D is 32, 64,
    /// 96, 128 or 256. Scores are q·k · scale (default D^-½), soft-capped c·tanh(s / c) when softcap > 0.
    public func attentionCached(q: CUdeviceptr, qStride: Int, kcache: CUdeviceptr, vcache: CUdeviceptr, out: CUdeviceptr,
                                startPointer: CUdeviceptr, start: Int, tokens: Int, heads: Int, kvHeads: Int, headDim: Int,
                                maxKeys: Int, scale: Float? = nil, softcap: Float = 0, window: Int = 0, ring: Int? = nil,
                                stream: CUDAStream? = nil) throws {
        let ring = ring ?? maxKeys
        try require(Self.decodeHeadDims.contains(headDim) && kvHeads > 0 && heads % kvHeads == 0 && window >= 0
                        && ring > 0 && (ring >= maxKeys || (window > 0 && ring >= window)), "attentionCached",
                    "head dimension \(headDim) (32, 64, 96, 128 or 256), heads \(heads)/\(kvHeads), window \(window) or ring \(ring) (every position, or at least the window)")
        let f = try compiler.function(KernelSources.decode, "attention_cached_d\(headDim)")
        let shared = (9 * headDim + 64 + maxKeys) * 4
        try allowSharedMemory(f, bytes: shared, "attentionCached")
        try device.launch(f, grid: (tokens, heads, 1), block: (256, 1, 1), sharedMemory: shared, stream: stream,
                          [.pointer(q), .int(qStride), .pointer(kcache), .pointer(vcache), .pointer(out), .pointer(startPointer),
                           .int(start), .int(heads), .int(kvHeads), .float(scale ?? 1 / Float(headDim).squareRoot()), .float(softcap),
                           .int(window), .int(ring)])
    }

    /// The head dimensions of the generation kernels (attention_cached, attention_rows, rope_append_rows).
    public static let decodeHeadDims = [32, 64, 96, 128, 256]

    /// The LoRA A rows of a group (xa[b] = A[b, :] · in, fp32) with their input made in the same launch:
    /// mode 0 in = x, 1 in = RMSNorm(x)·(normWeight + normOffset), 2 in = act(x)·x2. `inOut` (when not 0) receives `in`
    /// (bf16). rows may be 0 (then only `in` is written).
    public func loraARows(a: CUdeviceptr, x: CUdeviceptr, x2: CUdeviceptr = 0, normWeight: CUdeviceptr = 0, inOut: CUdeviceptr,
                          xa: CUdeviceptr, rows: Int, cols: Int, mode: Int, eps: Float = 0, normOffset: Float = 0,
                          activation: MLPActivation = .silu, stream: CUDAStream? = nil) throws {
        try require(cols % 8 == 0 && (0...2).contains(mode), "loraARows", "cols \(cols) must be a multiple of 8, mode 0...2")
        // About 2 groups of 8 values per thread: each thread's loads then all go out at once (see lora_a_rows).
        let threads = min(1024, max(32, ((cols / 8 + 1) / 2 + 31) / 32 * 32))
        try device.launch(compiler.function(KernelSources.decode, "lora_a_rows"), grid: (max(rows, 1), 1, 1), block: (threads, 1, 1),
                          stream: stream,
                          [.pointer(a), .pointer(x), .pointer(x2), .pointer(normWeight), .pointer(inOut), .pointer(xa), .int(rows),
                           .int(cols), .int(mode), .float(eps), .float(normOffset), .int(activation.kernelCode)])
    }

    /// nf4Gemv with the columns split over `splits` (1, 2, 4 or 8) warps of each block and x read through L1;
    /// `tasks` encoded with `rowsPerBlock: NF4GemvTask.splitKRowsPerBlock(splits)`.
    public func nf4GemvSplitK(tasks: CUdeviceptr, taskCount: Int, blocks: Int, x: CUdeviceptr, cols: Int, blocksize: Int = 64,
                              nestedBlocksize: Int = 256, splits: Int, stream: CUDAStream? = nil) throws {
        try require(cols % 32 == 0 && blocksize >= 32 && blocksize.nonzeroBitCount == 1 && nestedBlocksize.nonzeroBitCount == 1
                        && taskCount >= 1 && taskCount <= 8 && [1, 2, 4, 8].contains(splits), "nf4GemvSplitK",
                    "cols \(cols) must be a multiple of 32, blocksizes powers of two, 1...8 tasks, splits 1/2/4/8 (got \(splits))")
        try device.launch(compiler.function(KernelSources.decode, "nf4_gemv_splitk"), grid: (blocks, 1, 1), block: (256, 1, 1),
                          stream: stream,
                          [.pointer(tasks), .int(taskCount), .pointer(x), .int(cols), .int(blocksize.trailingZeroBitCount),
                           .int(nestedBlocksize.trailingZeroBitCount), .int(splits)])
    }
}
