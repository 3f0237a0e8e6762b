// Launchers for Kernels/nf4.cu: NF4 (+ double-quant) dequantization to bf16, and to fp32 with the CPU's rounding
// (the GPU merge). Layout and formula: see nf4.cu. Double-quantized tensors whose block sizes are powers of two
// (blocks of at least 64) go through the tiles kernel, up to three per launch (`nf4DequantizeTiles`); the others
// through the one-thread-per-8-outputs kernel, which gives the same bits.

/// Where the per-block scales of an NF4 tensor come from.
public enum NF4Scales {
    /// One fp32 absmax per block.
    case float32(absmax: DeviceBuffer<Float>)
    /// Double quantization: absmax[b] = code[quantized[b]] * nestedAbsmax[b / nestedBlocksize] + offset.
    case doubleQuant(quantized: DeviceBuffer<UInt8>, code: DeviceBuffer<Float>, nestedAbsmax: DeviceBuffer<Float>,
                     offset: Float, nestedBlocksize: Int)
}

/// One double-quantized NF4 tensor of a `nf4DequantizeTiles` launch: its codes and scales (NF4Scales.doubleQuant),
/// and where its `count` h16 values go (`out` from element `outOffset`): densely, or, with `rowStride`, as rows of
/// `columns` values `rowStride` apart (the trainer's folded LoRA writes s·B into the columns past `columns`).
public struct NF4DequantizeTask {
    public var packed: DeviceBuffer<UInt8>
    public var quantized: DeviceBuffer<UInt8>
    public var code: DeviceBuffer<Float>
    public var nestedAbsmax: DeviceBuffer<Float>
    public var offset: Float
    public var blocksize: Int
    public var nestedBlocksize: Int
    public var count: Int
    public var out: DeviceBuffer<UInt16>
    public var outOffset: Int
    /// Rows of `columns` values `rowStride` apart in `out` (nil: dense).
    public var rowStride: (columns: Int, stride: Int)?

    public init(packed: DeviceBuffer<UInt8>, quantized: DeviceBuffer<UInt8>, code: DeviceBuffer<Float>, nestedAbsmax: DeviceBuffer<Float>,
                offset: Float, blocksize: Int = 64, nestedBlocksize: Int = 256, count: Int, out: DeviceBuffer<UInt16>, outOffset: Int = 0,
                rowStride: (columns: Int, stride: Int)? = nil) {
        self.rowStride = rowStride
        self.packed = packed
        self.quantized = quantized
        self.code = code
        self.nestedAbsmax = nestedAbsmax
        self.offset = offset
        self.blocksize = blocksize
        self.nestedBlocksize = nestedBlocksize
        self.count = count
        self.out = out
        self.outOffset = outOffset
    }
}

extension CUDAContext {
    /// Elements one warp of the tiles kernel dequantizes (NF4_TILE), and warps per thread block (NF4_TILE_WARPS).
    static let nf4TileElements = 2048, nf4TileWarps = 8

    /// Whether the tiles kernel takes these block sizes: powers of two, quantization blocks of at least 64 elements
    /// (a tile then spans at most 32 blocks, one per lane).
    public static func nf4TilesTake(blocksize: Int, nestedBlocksize: Int) -> Bool {
        blocksize >= 64 && blocksize.nonzeroBitCount == 1 && nestedBlocksize > 0 && nestedBlocksize.nonzeroBitCount == 1
    }

    /// Dequantizes one to three double-quantized NF4 tensors in one launch (e.g. a block's q, k and v), each into its
    /// own h16 output; all share one blocksize and nested blocksize that `nf4TilesTake` accepts.
    public func nf4DequantizeTiles(_ tasks: [NF4DequantizeTask], stream: CUDAStream? = nil) throws {
        let op = "nf4DequantizeTiles"
        try require((1...3).contains(tasks.count), op, "takes 1 to 3 tensors, not \(tasks.count)")
        let blocksize = tasks[0].blocksize, nestedBlocksize = tasks[0].nestedBlocksize
        try require(Self.nf4TilesTake(blocksize: blocksize, nestedBlocksize: nestedBlocksize), op,
                    "blocksize \(blocksize) and nested blocksize \(nestedBlocksize) must be powers of two, the blocksize at least 64")
        var arguments: [KernelArgument] = []
        var ctaStarts: [Int] = []
        var ctas = 0
        for (i, t) in tasks.enumerated() {
            let blocks = (t.count + blocksize - 1) / blocksize
            try require(t.blocksize == blocksize && t.nestedBlocksize == nestedBlocksize, op,
                        "tensor \(i) has blocksizes \(t.blocksize)/\(t.nestedBlocksize), tensor 0 \(blocksize)/\(nestedBlocksize): one launch takes one pair")
            try require(t.count >= 0 && t.outOffset >= 0, op, "tensor \(i): negative count \(t.count) or output offset \(t.outOffset)")
            try require(t.packed.count >= (t.count + 1) / 2, op, "tensor \(i): packed holds \(t.packed.count) bytes, \(t.count) values need \((t.count + 1) / 2)")
            // Rows of `columns` values `stride` apart: the last row ends at (rows − 1)·stride + columns.
            let (columns, stride) = t.rowStride ?? (max(t.count, 1), max(t.count, 1))
            try require(columns > 0 && stride >= columns && t.count % columns == 0 && columns <= Int(Int32.max), op,
                        "tensor \(i): \(t.count) values do not make rows of \(columns) values \(stride) apart")
            let extent = t.count == 0 ? 0 : (t.count / columns - 1) * stride + columns
            try require(t.out.count >= t.outOffset + extent, op,
                        "tensor \(i): output holds \(t.out.count) values, \(t.count) from element \(t.outOffset) need \(t.outOffset + extent)")
            try require(t.quantized.count >= blocks, op, "tensor \(i): quantized absmax holds \(t.quantized.count) codes, \(blocks) needed")
            try require(t.code.count == 256, op, "tensor \(i): the absmax code map must have 256 entries, not \(t.code.count)")
            try require(t.nestedAbsmax.count >= (blocks + nestedBlocksize - 1) / nestedBlocksize, op,
                        "tensor \(i): nested absmax holds \(t.nestedAbsmax.count) scales for \(blocks) blocks in groups of \(nestedBlocksize)")
            ctaStarts.append(ctas)
            let tiles = (t.count + Self.nf4TileElements - 1) / Self.nf4TileElements
            ctas += (tiles + Self.nf4TileWarps - 1) / Self.nf4TileWarps
            arguments += [t.packed.arg, t.quantized.arg, t.code.arg, t.nestedAbsmax.arg, .float(t.offset), .pointer(t.out.address(at: t.outOffset)),
                          .int64(Int64(t.count)), .int(columns), .int64(Int64(stride))]
        }
        try require(ctas < Int(Int32.max), op, "\(ctas) thread blocks exceed the grid")
        guard ctas > 0 else { return }
        // Absent tensors: count 0 and no thread blocks (their pointers are never read).
        for _ in tasks.count..<3 {
            ctaStarts.append(ctas)
            arguments += [.pointer(0), .pointer(0), .pointer(0), .pointer(0), .float(0), .pointer(0), .int64(0), .int(1), .int64(1)]
        }
        arguments += [.int(ctaStarts[1]), .int(ctaStarts[2]), .int(blocksize.trailingZeroBitCount), .int(nestedBlocksize.trailingZeroBitCount)]
        try device.launch(compiler.function(KernelSources.nf4, "nf4_dequantize_double_quant_tiles"), grid: (ctas, 1, 1),
                          block: (32 * Self.nf4TileWarps, 1, 1), stream: stream, arguments)
    }

    /// Dequantizes `count` NF4 values (`packed`: two per byte, first in the high nibble) into bf16 `out`.
    /// `tiled: false` keeps double-quantized tensors on the one-thread-per-8-outputs kernel (the benchmarks' baseline).
    public func nf4Dequantize(packed: DeviceBuffer<UInt8>, scales: NF4Scales, blocksize: Int = 64, count: Int,
                              into out: DeviceBuffer<UInt16>, tiled: Bool = true, stream: CUDAStream? = nil) throws {
        let op = "nf4Dequantize"
        let blocks = (count + blocksize - 1) / blocksize
        try require(blocksize > 0 && blocksize % 8 == 0, op, "blocksize \(blocksize) must be a positive multiple of 8")
        try require(packed.count >= (count + 1) / 2, op, "packed holds \(packed.count) bytes, \(count) values need \((count + 1) / 2)")
        try require(out.count >= count, op, "output holds \(out.count) values, \(count) needed")
        let grid = gridSize(items: (count + 7) / 8)
        switch scales {
        case .float32(let absmax):
            try require(absmax.count >= blocks, op, "absmax holds \(absmax.count) scales, \(blocks) blocks need one each")
            try device.launch(compiler.function(KernelSources.nf4, "nf4_dequantize"), grid: (grid, 1, 1), block: (256, 1, 1),
                              stream: stream, [packed.arg, absmax.arg, .int(blocksize), out.arg, .int64(Int64(count))])
        case let .doubleQuant(quantized, code, nestedAbsmax, offset, nestedBlocksize):
            if tiled && Self.nf4TilesTake(blocksize: blocksize, nestedBlocksize: nestedBlocksize) {
                let task = NF4DequantizeTask(packed: packed, quantized: quantized, code: code, nestedAbsmax: nestedAbsmax, offset: offset,
                                             blocksize: blocksize, nestedBlocksize: nestedBlocksize, count: count, out: out)
                return try nf4DequantizeTiles([task], stream: stream)
            }
            try require(quantized.count >= blocks, op, "quantized absmax holds \(quantized.count) codes, \(blocks) needed")
            try require(code.count == 256, op, "the absmax code map must have 256 entries, not \(code.count)")
            try require(nestedBlocksize > 0 && nestedAbsmax.count >= (blocks + nestedBlocksize - 1) / nestedBlocksize, op,
                        "nested absmax holds \(nestedAbsmax.count) scales for \(blocks) blocks in groups of \(nestedBlocksize)")
            try device.launch(compiler.function(KernelSources.nf4, "nf4_dequantize_double_quant"), grid: (grid, 1, 1),
                              block: (256, 1, 1), stream: stream,
                              [packed.arg, quantized.arg, code.arg, nestedAbsmax.arg, .float(offset), .int(blocksize),
                               .int(nestedBlocksize), out.arg, .int64(Int64(count))])
        }
    }

    /// Dequantizes `count` NF4 values with double-quantized absmax into fp32 `out`, rounding as the CPU does
    /// (`QuantizedWeight.dequantize()`: separate fp32 multiply and add, no fused multiply-add), so the values are the
    /// CPU's bit for bit. With `roundingToBF16` each value is rounded to the nearest bf16 (staying fp32), as the CPU
    /// does for a weight whose dtype is bf16.
    public func nf4DequantizeFloat(packed: DeviceBuffer<UInt8>, quantized: DeviceBuffer<UInt8>, code: DeviceBuffer<Float>,
                                   nestedAbsmax: DeviceBuffer<Float>, offset: Float, blocksize: Int = 64, nestedBlocksize: Int = 256,
                                   roundingToBF16: Bool = false, count: Int, into out: DeviceBuffer<Float>,
                                   stream: CUDAStream? = nil) throws {
        let op = "nf4DequantizeFloat"
        let blocks = (count + blocksize - 1) / blocksize
        try require(blocksize > 0, op, "blocksize \(blocksize) must be positive")
        try require(packed.count >= (count + 1) / 2, op, "packed holds \(packed.count) bytes, \(count) values need \((count + 1) / 2)")
        try require(out.count >= count, op, "output holds \(out.count) values, \(count) needed")
        try require(quantized.count >= blocks, op, "quantized absmax holds \(quantized.count) codes, \(blocks) needed")
        try require(code.count == 256, op, "the absmax code map must have 256 entries, not \(code.count)")
        try require(nestedBlocksize > 0 && nestedAbsmax.count >= (blocks + nestedBlocksize - 1) / nestedBlocksize, op,
                    "nested absmax holds \(nestedAbsmax.count) scales for \(blocks) blocks in groups of \(nestedBlocksize)")
        try device.launch(compiler.function(KernelSources.nf4, "nf4_dequantize_double_quant_f32"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [packed.arg, quantized.arg, code.arg, nestedAbsmax.arg, .float(offset), .int(blocksize),
                           .int(nestedBlocksize), .int(roundingToBF16 ? 1 : 0), out.arg, .int64(Int64(count))])
    }
}
