// A frozen linear weight on the GPU in bitsandbytes' NF4 layout with double quantization, shared by the trainer
// (dequantized into a bf16 scratch before each GEMM), generation (prefill GEMMs and the decode GEMV, which reads the
// 4-bit codes directly) and the GPU merge (dequantized to fp32).
//
// Layout ([rows, columns] row-major, flattened; see Quantization/QuantizedWeight.swift and Kernels/nf4.cu):
//   packed        UInt8 [(count + 1) / 2]   two 4-bit codes per byte, the first element in the high nibble
//   absmaxCodes   UInt8 [blocks]            8-bit code of each block's absmax (blocks of `blocksize` = 64)
//   nestedAbsmax  Float [blocks / 256]      one scale per `nestedBlocksize` (256) blocks
//   code          Float [256]               the 8-bit map (bitsandbytes' signed dynamic map)
//   absmax[b] = code[absmaxCodes[b]] · nestedAbsmax[b / nestedBlocksize] + offset
//   w[e]      = NF4[nibble(e)] · absmax[e / blocksize]

/// A 2-D NF4 weight with double-quantized absmax on the device.
public final class CUDANF4Weight {
    public let rows: Int
    public let columns: Int
    public let blocksize: Int
    public let nestedBlocksize: Int
    public let offset: Float
    public let packed: DeviceBuffer<UInt8>
    public let absmaxCodes: DeviceBuffer<UInt8>
    public let nestedAbsmax: DeviceBuffer<Float>
    /// The 256-entry map of the absmax codes (often one buffer shared by every weight).
    public let code: DeviceBuffer<Float>

    /// Elements, rows × columns.
    public var count: Int { rows * columns }

    /// Bytes a GEMV reads: packed codes, absmax codes and nested absmax.
    public var bytesRead: Int { packed.byteCount + absmaxCodes.byteCount + nestedAbsmax.byteCount }

    /// The scales as the dequantization launcher takes them.
    public var scales: NF4Scales {
        .doubleQuant(quantized: absmaxCodes, code: code, nestedAbsmax: nestedAbsmax, offset: offset, nestedBlocksize: nestedBlocksize)
    }

    /// Uploads a bitsandbytes NF4 weight with double quantization, [rows, columns]. `signedDynamicMap`, when given,
    /// must hold `DoubleQuantizedAbsmax.signedDynamicMap`; it is shared instead of uploading the weight's own map
    /// when that is the same (as bitsandbytes writes it), so a model keeps one copy.
    public init(_ q: QuantizedWeight, allocator: DeviceAllocator, signedDynamicMap: DeviceBuffer<Float>? = nil) throws {
        guard q.quantType == .nf4, q.shape.count == 2, case .doubleQuantized(let d) = q.scales else {
            throw UsageError("the GPU takes 2-D NF4 weights with double quantization (got \(q.quantType), shape \(q.shape))")
        }
        guard d.code.count == 256 else {
            throw UsageError("the absmax map of a double-quantized weight must have 256 entries, not \(d.code.count)")
        }
        rows = q.shape[0]
        columns = q.shape[1]
        blocksize = q.blocksize
        nestedBlocksize = d.blocksize
        offset = d.offset
        packed = try allocator.buffer(copying: q.packed)
        absmaxCodes = try allocator.buffer(copying: d.codes)
        nestedAbsmax = try allocator.buffer(copying: d.nestedAbsmax)
        if let signedDynamicMap, d.code == DoubleQuantizedAbsmax.signedDynamicMap {
            code = signedDynamicMap
        } else {
            code = try allocator.buffer(copying: d.code)
        }
    }

    /// A weight over buffers that already hold its parts (views into a sharded base's staging buffer: the weight's
    /// values are whatever the buffer holds when a kernel reads it).
    init(rows: Int, columns: Int, blocksize: Int, nestedBlocksize: Int, offset: Float, packed: DeviceBuffer<UInt8>,
         absmaxCodes: DeviceBuffer<UInt8>, nestedAbsmax: DeviceBuffer<Float>, code: DeviceBuffer<Float>) {
        self.rows = rows
        self.columns = columns
        self.blocksize = blocksize
        self.nestedBlocksize = nestedBlocksize
        self.offset = offset
        self.packed = packed
        self.absmaxCodes = absmaxCodes
        self.nestedAbsmax = nestedAbsmax
        self.code = code
    }

    /// Random codes made on the device, for benchmarks (no checkpoint needed): uniform 4-bit codes and absmax codes,
    /// nested absmax 0.01 and offset 0.04, so absmax = code[q]·0.01 + 0.04 ∈ [0.03, 0.05] and the weights have a
    /// standard deviation of about 0.02, like real layers. `code` must hold the signed dynamic map.
    public init(randomRows rows: Int, columns: Int, context: CUDAContext, code: DeviceBuffer<Float>, packedSeed: UInt64,
                absmaxSeed: UInt64) throws {
        self.rows = rows
        self.columns = columns
        blocksize = 64
        nestedBlocksize = 256
        offset = 0.04
        let n = rows * columns, blocks = (n + 63) / 64
        let a = context.allocator
        packed = try a.buffer(UInt8.self, count: (n + 1) / 2)
        absmaxCodes = try a.buffer(UInt8.self, count: blocks)
        nestedAbsmax = try a.buffer(copying: [Float](repeating: 0.01, count: (blocks + 255) / 256))
        self.code = code
        try context.fillRandomBytes(packed.pointer, count: packed.count, seed: packedSeed)
        try context.fillRandomBytes(absmaxCodes.pointer, count: absmaxCodes.count, seed: absmaxSeed)
    }
}

extension CUDAContext {
    /// Dequantizes `weight` into bf16 `out` (at least `weight.count` values), e.g. a scratch matrix for a GEMM.
    public func dequantize(_ weight: CUDANF4Weight, into out: DeviceBuffer<UInt16>, stream: CUDAStream? = nil) throws {
        try nf4Dequantize(packed: weight.packed, scales: weight.scales, blocksize: weight.blocksize, count: weight.count,
                          into: out, stream: stream)
    }

    /// Dequantizes each weight into its output (at least `weight.count` values), up to three per launch when the
    /// tiles kernel takes their block sizes (a block's q, k, v; gate, up): the same bits as one
    /// `dequantize(_:into:)` each.
    public func dequantize(_ jobs: [(weight: CUDANF4Weight, out: DeviceBuffer<UInt16>)], stream: CUDAStream? = nil) throws {
        try dequantize(jobs.map { ($0.weight, $0.out, nil) }, stream: stream)
    }

    /// As `dequantize(_:stream:)`, each weight's rows `rowStride` apart in its output when given (the trainer's folded
    /// LoRA; only the tiles kernel takes a stride: a weight whose block sizes it does not take is refused).
    public func dequantize(_ jobs: [(weight: CUDANF4Weight, out: DeviceBuffer<UInt16>, rowStride: Int?)], stream: CUDAStream? = nil) throws {
        var pending: [NF4DequantizeTask] = []
        func flush() throws {
            if !pending.isEmpty { try nf4DequantizeTiles(pending, stream: stream) }
            pending = []
        }
        for (w, out, rowStride) in jobs {
            guard Self.nf4TilesTake(blocksize: w.blocksize, nestedBlocksize: w.nestedBlocksize) else {
                if let rowStride, rowStride != w.columns {
                    throw CUDAError(call: "dequantize", "a row stride needs block sizes the tiles kernel takes, not \(w.blocksize)/\(w.nestedBlocksize)")
                }
                try dequantize(w, into: out, stream: stream)
                continue
            }
            if let first = pending.first, pending.count == 3 || first.blocksize != w.blocksize || first.nestedBlocksize != w.nestedBlocksize {
                try flush()
            }
            pending.append(NF4DequantizeTask(packed: w.packed, quantized: w.absmaxCodes, code: w.code, nestedAbsmax: w.nestedAbsmax,
                                             offset: w.offset, blocksize: w.blocksize, nestedBlocksize: w.nestedBlocksize, count: w.count,
                                             out: out, rowStride: rowStride.map { (w.columns, $0) }))
        }
        try flush()
    }

    /// Dequantizes `weight` into fp32 `out` with the CPU's rounding: `QuantizedWeight.dequantize()` bit for bit when
    /// `roundingToBF16` matches the weight's dtype being bf16.
    public func dequantize(_ weight: CUDANF4Weight, into out: DeviceBuffer<Float>, roundingToBF16: Bool,
                           stream: CUDAStream? = nil) throws {
        try nf4DequantizeFloat(packed: weight.packed, quantized: weight.absmaxCodes, code: weight.code,
                               nestedAbsmax: weight.nestedAbsmax, offset: weight.offset, blocksize: weight.blocksize,
                               nestedBlocksize: weight.nestedBlocksize, roundingToBF16: roundingToBF16, count: weight.count,
                               into: out, stream: stream)
    }
}
