// Launchers for Kernels/lora_dropout.cu: LoRA dropout fused into the rank-r products, so d(x) = x·m/(1−p) never
// exists in memory (the kernel file's header has the math and the fragment layouts).
//
// With x [tokens, in], A [r, in], dyB = dy·B [tokens, r], m the keep mask of `LoRADropoutMask` (Training/DropoutMask
// .swift's hash of the seed and element index token·in + column) and keep = 1 − p:
//   forward          xa  = (m⊙x)·Aᵀ / keep                     = d(x)·Aᵀ
//   backward, dA     dA += s·dyBᵀ·(m⊙x) / keep                 = s·dyBᵀ·d(x)
//   backward, dx     dx += m ⊙ (s·dyB·A) / keep                = d(s·dyB·A)
// Each reads its [tokens, in] operand once. dA sums token splits into an fp32 scratch and adds the splits in order
// (`loraDropoutScratchCount` floats), so a run has the same bits every time. Hashing the mask is most of what these
// kernels cost, so it can be hashed once a step: the forward's xa writes it as bits (`loraDropoutMaskBytes`: one bit
// per element) and dA and dx read them; or, when the bits cannot be kept until the backward, dA hashes it again and
// writes the bits for dx. x's rows may be `xStride` ≥ in apart (the trainer's folded LoRA: x·Aᵀ after each row).

/// The LoRA dropout of one linear in one step: the mask's seed (`DropoutMask.linearSeed`) and keep = 1 − p (fp32).
public struct LoRADropoutMask {
    public var seed: UInt64
    public var keep: Float

    public init(seed: UInt64, keep: Float) {
        self.seed = seed
        self.keep = keep
    }
}

extension CUDAContext {
    /// Token splits of `loraDropoutGradA`'s partial sums: about 384 blocks of 256 columns in all (a large GPU's SMs a few
    /// times over), at least 128 tokens a split. Grows with `tokens`, so a trainer's scratch sized at its capacity fits
    /// every smaller batch.
    public static func loraDropoutSplits(tokens: Int, inFeatures: Int) -> Int {
        let columnBlocks = max(1, (inFeatures + 255) / 256)
        return max(1, min((tokens + 127) / 128, (384 + columnBlocks - 1) / columnBlocks))
    }

    /// fp32 elements of the scratch `loraDropoutGradA` needs for `tokens` x `inFeatures` at rank `rank`.
    public static func loraDropoutScratchCount(tokens: Int, inFeatures: Int, rank: Int) -> Int {
        loraDropoutSplits(tokens: tokens, inFeatures: inFeatures) * rank * inFeatures
    }

    /// Bytes of the mask bits of `tokens` x `inFeatures` (bit e of byte b in row t: element t·in + 8b + e).
    public static func loraDropoutMaskBytes(tokens: Int, inFeatures: Int) -> Int {
        tokens * ((inFeatures + 7) / 8)
    }

    private func checkMaskBits(_ op: String, _ bits: DeviceBuffer<UInt8>?, tokens: Int, inFeatures: Int) throws {
        guard let bits else { return }
        let bytes = CUDAContext.loraDropoutMaskBytes(tokens: tokens, inFeatures: inFeatures)
        try require(bits.count >= bytes, op, "mask bits of \(bits.count) bytes are fewer than \(bytes) for \(tokens) x \(inFeatures)")
    }

    private func checkLoRADropout(_ op: String, tokens: Int, inFeatures: Int, rank: Int, mask: LoRADropoutMask) throws {
        try require(tokens > 0 && inFeatures > 0 && rank > 0, op, "empty shape: \(tokens) tokens, in \(inFeatures), rank \(rank)")
        try require(mask.keep > 0 && mask.keep <= 1, op, "keep probability \(mask.keep) is outside (0, 1]")
        try require(tokens <= Int(Int32.max) && inFeatures <= Int(Int32.max) && rank <= Int(Int32.max), op, "shape exceeds 32-bit indices")
    }

    /// xa [tokens, rank] = d(x)·Aᵀ for x [tokens, inFeatures] and A [rank, inFeatures] (h16 each); writes the mask into
    /// `maskBits` (`loraDropoutMaskBytes`) when given, for `loraDropoutGradA` and `loraDropoutAddDX`.
    public func loraDropoutXA(x: CUdeviceptr, a: CUdeviceptr, into xa: CUdeviceptr, tokens: Int, inFeatures: Int, rank: Int,
                              mask: LoRADropoutMask, maskBits: DeviceBuffer<UInt8>? = nil, xStride: Int? = nil,
                              stream: CUDAStream? = nil) throws {
        try checkLoRADropout("loraDropoutXA", tokens: tokens, inFeatures: inFeatures, rank: rank, mask: mask)
        let ldx = xStride ?? inFeatures
        try require(ldx >= inFeatures, "loraDropoutXA", "x's row stride \(ldx) is shorter than its \(inFeatures) columns")
        try checkMaskBits("loraDropoutXA", maskBits, tokens: tokens, inFeatures: inFeatures)
        // Ranks per block: 16, 32 or 64 (the kernel's NT = 2, 4, 8 mma tiles of 8); larger ranks in chunks of 64.
        let tile = rank <= 16 ? 16 : rank <= 32 ? 32 : 64
        try device.launch(compiler.function(KernelSources.loraDropout, "lora_dropout_xa_r\(tile)"),
                          grid: ((tokens + 15) / 16, (rank + tile - 1) / tile, 1), block: (256, 1, 1), stream: stream,
                          [.pointer(x), .pointer(a), .pointer(xa), .pointer(maskBits?.pointer ?? 0), .int(tokens), .int(inFeatures),
                           .int(rank), .int64(Int64(bitPattern: mask.seed)), .float(mask.keep), .int64(Int64(ldx))])
    }

    /// dA [rank, inFeatures] (fp32) += scale·dyBᵀ·d(x), through `scratch` (`loraDropoutScratchCount` floats). The mask:
    /// `storedMaskBits` written by `loraDropoutXA` with the same `mask` and shape, or, when nil, hashed here and written
    /// into `maskBits` (`loraDropoutMaskBytes`) when given, for `loraDropoutAddDX`.
    public func loraDropoutGradA(x: CUdeviceptr, dyB: CUdeviceptr, into dA: CUdeviceptr, scratch: DeviceBuffer<Float>, tokens: Int,
                                 inFeatures: Int, rank: Int, scale: Float, mask: LoRADropoutMask, maskBits: DeviceBuffer<UInt8>? = nil,
                                 storedMaskBits: DeviceBuffer<UInt8>? = nil, xStride: Int? = nil, stream: CUDAStream? = nil) throws {
        try checkLoRADropout("loraDropoutGradA", tokens: tokens, inFeatures: inFeatures, rank: rank, mask: mask)
        let ldx = xStride ?? inFeatures
        try require(ldx >= inFeatures, "loraDropoutGradA", "x's row stride \(ldx) is shorter than its \(inFeatures) columns")
        try require(maskBits == nil || storedMaskBits == nil, "loraDropoutGradA", "mask bits to write and to read: give one of them")
        try checkMaskBits("loraDropoutGradA", maskBits, tokens: tokens, inFeatures: inFeatures)
        try checkMaskBits("loraDropoutGradA", storedMaskBits, tokens: tokens, inFeatures: inFeatures)
        let splits = CUDAContext.loraDropoutSplits(tokens: tokens, inFeatures: inFeatures)
        try require(scratch.count >= splits * rank * inFeatures, "loraDropoutGradA",
                    "scratch of \(scratch.count) floats is smaller than \(splits) splits x \(rank) x \(inFeatures)")
        let tile = rank <= 16 ? 16 : 32
        try device.launch(compiler.function(KernelSources.loraDropout, "lora_dropout_da_r\(tile)"),
                          grid: ((inFeatures + 255) / 256, splits, (rank + tile - 1) / tile), block: (128, 1, 1), stream: stream,
                          [.pointer(x), .pointer(dyB), scratch.arg, .pointer(storedMaskBits?.pointer ?? 0), .pointer(maskBits?.pointer ?? 0),
                           .int(tokens), .int(inFeatures), .int(rank), .int(splits),
                           .int64(Int64(bitPattern: mask.seed)), .float(mask.keep), .int64(Int64(ldx))])
        let count = rank * inFeatures
        try device.launch(compiler.function(KernelSources.loraDropout, "lora_dropout_da_finish"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [scratch.arg, .pointer(dA), .int64(Int64(count)), .int(splits), .float(scale), .float(mask.keep)])
    }

    /// dx [tokens, inFeatures] (h16) += d(scale·dyB·A), rounding dx once per element. The mask: `maskBits` written by
    /// `loraDropoutXA` or `loraDropoutGradA` with the same `mask` and shape, or, when nil, hashed here.
    public func loraDropoutAddDX(dyB: CUdeviceptr, a: CUdeviceptr, into dx: CUdeviceptr, tokens: Int, inFeatures: Int, rank: Int,
                                 scale: Float, mask: LoRADropoutMask, maskBits: DeviceBuffer<UInt8>? = nil,
                                 stream: CUDAStream? = nil) throws {
        try checkLoRADropout("loraDropoutAddDX", tokens: tokens, inFeatures: inFeatures, rank: rank, mask: mask)
        try checkMaskBits("loraDropoutAddDX", maskBits, tokens: tokens, inFeatures: inFeatures)
        let columnBlocks = (inFeatures + 255) / 256
        let tokenBlocks = min((tokens + 15) / 16, max(1, (4 * device.multiprocessorCount + columnBlocks - 1) / columnBlocks))
        try device.launch(compiler.function(KernelSources.loraDropout, "lora_dropout_dx"), grid: (columnBlocks, tokenBlocks, 1),
                          block: (128, 1, 1), stream: stream,
                          [.pointer(dyB), .pointer(a), .pointer(dx), .pointer(maskBits?.pointer ?? 0), .int(tokens), .int(inFeatures),
                           .int(rank),
                           .int64(Int64(bitPattern: mask.seed)), .float(mask.keep), .float(scale / mask.keep)])
    }
}
