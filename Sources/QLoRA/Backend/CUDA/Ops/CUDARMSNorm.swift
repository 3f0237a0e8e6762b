// Launchers for Kernels/rmsnorm.cu: RMSNorm forward and input gradient (h16 in and out, fp32 sums), with the family
// variations: Gemma's (1 + w) weight offset and its sandwich norm's residual add.

extension CUDAContext {
    /// y = RMSNorm(x) · (weight + weightOffset) for `rows` rows of `dim` values (the rounding of rmsnorm.cu: HF
    /// LlamaRMSNorm's when the offset is 0, one rounding otherwise, as Gemma's norm). With `residual`,
    /// y = h16(residual + h16(norm)); `y` may be `residual` itself. Rows as short as a head (q/k norms over
    /// rows = tokens · heads) take a warp each. `outputStride`: y's rows that far apart (≥ dim; no residual then),
    /// as the trainer's folded LoRA reads them (x·Aᵀ in the columns past dim).
    public func rmsNormForward(x: DeviceBuffer<UInt16>, weight: DeviceBuffer<UInt16>, into y: DeviceBuffer<UInt16>,
                               rows: Int, dim: Int, eps: Float, weightOffset: Float = 0, residual: DeviceBuffer<UInt16>? = nil,
                               outputStride: Int? = nil, stream: CUDAStream? = nil) throws {
        let stride = outputStride ?? dim
        try require(stride >= dim && (stride == dim || residual == nil), "rmsNormForward",
                    "output stride \(stride) for rows of \(dim)\(residual == nil ? "" : " with a residual")")
        try require(x.count >= rows * dim && y.count >= (rows - 1) * stride + dim && weight.count >= dim
                        && (residual?.count ?? Int.max) >= rows * dim, "rmsNormForward",
                    "buffers too small for \(rows) x \(dim)")
        guard rows > 0 else { return }
        let (grid, block, warpRows) = Self.rowLayout(rows: rows, dim: dim)
        try device.launch(compiler.function(KernelSources.rmsnorm, "rmsnorm_forward_rows"), grid: (grid, 1, 1),
                          block: (block, 1, 1), stream: stream,
                          [x.arg, weight.arg, .pointer(residual?.pointer ?? 0), y.arg, .int(rows), .int(dim), .float(eps),
                           .float(weightOffset), .int(warpRows ? 1 : 0), .int64(Int64(stride))])
    }

    /// dx (= or += when `accumulate`) the gradient of RMSNorm (with weight + weightOffset) wrt its input, given dy.
    /// `dyStride`, `dxStride`: dy's and dx's rows that far apart (≥ dim; default dim), as the trainer's residual
    /// gradient has them when its LoRA backward is folded (dy·B in the columns past dim, left as they are). dx may be
    /// dy with the same stride (each row is read first).
    public func rmsNormBackward(x: DeviceBuffer<UInt16>, weight: DeviceBuffer<UInt16>, dy: DeviceBuffer<UInt16>,
                                into dx: DeviceBuffer<UInt16>, rows: Int, dim: Int, eps: Float, weightOffset: Float = 0,
                                accumulate: Bool = false, dyStride: Int? = nil, dxStride: Int? = nil, stream: CUDAStream? = nil) throws {
        let ldy = dyStride ?? dim, ldx = dxStride ?? dim
        try require(ldy >= dim && ldx >= dim && (dy.pointer != dx.pointer || ldy == ldx), "rmsNormBackward",
                    "row strides dy \(ldy), dx \(ldx) for rows of \(dim) (in place: equal)")
        try require(x.count >= rows * dim && dy.count >= (rows - 1) * ldy + dim && dx.count >= (rows - 1) * ldx + dim && weight.count >= dim,
                    "rmsNormBackward", "buffers too small for \(rows) x \(dim)")
        guard rows > 0 else { return }
        let (grid, block, warpRows) = Self.rowLayout(rows: rows, dim: dim)
        try device.launch(compiler.function(KernelSources.rmsnorm, "rmsnorm_backward"), grid: (grid, 1, 1),
                          block: (block, 1, 1), stream: stream,
                          [x.arg, weight.arg, dy.arg, dx.arg, .int(rows), .int(dim), .float(eps), .float(weightOffset),
                           .int(accumulate ? 1 : 0), .int(warpRows ? 1 : 0), .int64(Int64(ldy)), .int64(Int64(ldx))])
    }

    /// Threads for a one-block-per-row kernel: a multiple of 32, about 8 values per thread, 32...1024.
    static func rowThreads(_ dim: Int) -> Int {
        min(1024, max(32, ((dim / 8) + 31) / 32 * 32))
    }

    /// Rows of at most 256 values get one warp each (a block per row would be a single warp too: the same sums, but
    /// 8 rows to a 256-thread block keep the SMs full); longer rows a block each.
    static func rowLayout(rows: Int, dim: Int) -> (grid: Int, block: Int, warpRows: Bool) {
        if dim <= 256 { return ((rows + 7) / 8, 256, true) }
        return (rows, rowThreads(dim), false)
    }
}
