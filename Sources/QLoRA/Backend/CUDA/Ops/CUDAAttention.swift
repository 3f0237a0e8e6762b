// Launchers for Kernels/attention_mma.cu (tensor cores: the flash kernels `attention_fa_*` are the default, the
// earlier 64-row `attention_mma_*` kernels stay selectable with `flash: false`) and Kernels/attention.cu (fp32 FMAs,
// kept as a second implementation to check against): causal GQA attention, forward and backward, without storing
// scores. The variations of the families (formulas in attention.cu's header): any logit scale, soft-capped logits
// (Gemma 2: the `_cap` kernels, so that Llama's path has no tanh), and a sliding window (Mistral, Gemma, Qwen3 layer
// types: key tiles wholly outside it are skipped, in the forward and the backward).
// On Hopper (sm_90a kernels) the flash forward and backward at head dimension 128 without soft-capping run on wgmma
// (Kernels/attention_wgmma.cu), by default the pipelined kernels (`.wgmmaPipelined`); QLORA_ATTENTION=wgmma picks the
// simple ones, wgmma-forward only the forward, and `kernel: .mma`, or QLORA_ATTENTION=mma for every call that does
// not name one (the trainer's, so `qlora bench` and `qlora train`), keeps both on the mma.sync kernels. Every other shape and card, and the
// deterministic backward (`flash: false`), run the mma.sync kernels.

#if canImport(Glibc)
import Glibc
#endif

/// Which flash kernels run where the wgmma ones apply (`CUDAContext.wgmmaAttentionApplies`).
public enum AttentionKernel: String, Sendable, CaseIterable {
    /// attention_mma.cu's `attention_fa_forward` and `attention_fa_backward` (mma.sync m16n8k16): every card and head
    /// dimension.
    case mma
    /// attention_wgmma.cu's `attention_wgmma_forward_d128` (wgmma m64n128k16) with the mma.sync flash backward
    /// (session 7's default: the 8B shape trained 2.4% faster at 2 × 2048 and 6.2% at 1 × 32,768 than with mma).
    case wgmmaForward = "wgmma-forward"
    /// Both wgmma kernels: the forward and `attention_wgmma_backward_d128` (wgmma m64n64k16 / m64n128k16).
    case wgmma
    /// `attention_wgmma_forward_pipelined_d128` and `attention_wgmma_backward_pipelined_d128`: the same products in a
    /// pipelined order (forward: each tile's P V on the tensor cores while the next tile's softmax runs; backward: wgmma
    /// groups in flight while the P and dS work runs, the query tile's scalars by cp.async, dQ added by bulk
    /// reductions; attention_wgmma.cu). The default where they apply (H100, session 10: o, lse, dk, dv bit for bit
    /// the simple kernels'; backward 5-12% faster, forward 0-3%; the 8B shape at 1 × 32,768 +3.1%).
    case wgmmaPipelined = "wgmma-pipelined"

    /// Whether the d128 flash forward runs on wgmma (where it applies).
    public var forwardOnWGMMA: Bool { self != .mma }
    /// Whether the d128 flash backward runs on wgmma (where it applies).
    public var backwardOnWGMMA: Bool { self == .wgmma || self == .wgmmaPipelined }
    /// Whether the wgmma forward and backward are the pipelined ones.
    public var forwardPipelined: Bool { self == .wgmmaPipelined }
    public var backwardPipelined: Bool { self == .wgmmaPipelined }

    /// A value of QLORA_ATTENTION.
    public init(parsing text: String) throws {
        guard let kernel = AttentionKernel(rawValue: text.lowercased()) else {
            throw UsageError("QLORA_ATTENTION=\(text) is not an attention kernel (expected mma, wgmma-forward, wgmma or wgmma-pipelined)")
        }
        self = kernel
    }

    /// QLORA_ATTENTION's choice: wgmma-pipelined when it is unset or empty (the launcher runs mma where wgmma does
    /// not apply).
    public static func fromEnvironment() throws -> AttentionKernel {
        guard let text = getenv("QLORA_ATTENTION").map({ String(cString: $0) }), !text.isEmpty else { return .wgmmaPipelined }
        return try AttentionKernel(parsing: text)
    }
}

/// The shape of one attention call: `batch` rows of `seq` tokens, `heads` query heads sharing `kvHeads` KV heads,
/// and how logits are made and masked.
public struct AttentionShape {
    public var batch: Int
    public var seq: Int
    public var heads: Int
    public var kvHeads: Int
    public var headDim: Int
    /// Logits are `scale`·q·k: 1/√headDim by default; Gemma's is query_pre_attn_scalar^-½.
    public var scale: Float
    /// Soft-capping c (Gemma 2's `attn_logit_softcapping`): logits become c·tanh(scale·q·k / c). nil: none.
    public var softcap: Float?
    /// Sliding window: a query at position t sees keys j with t − window < j ≤ t (and its own packed sequence).
    /// nil: every earlier key.
    public var window: Int?

    public init(batch: Int, seq: Int, heads: Int, kvHeads: Int, headDim: Int, scale: Float? = nil, softcap: Float? = nil,
                window: Int? = nil) {
        self.batch = batch
        self.seq = seq
        self.heads = heads
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.scale = scale ?? 1 / Float(headDim).squareRoot()
        self.softcap = softcap
        self.window = window
    }

    public var tokens: Int { batch * seq }

    /// The window as the kernels take it (1 << 30: none; they compare key > query − window).
    var kernelWindow: Int32 { Int32(min(window ?? (1 << 30), 1 << 30)) }
    /// The kernel name's variant: `_cap_d<D>` with soft-capping, `_d<D>` without.
    var kernelSuffix: String { (softcap == nil ? "_d" : "_cap_d") + "\(headDim)" }
    /// The variation arguments every attention kernel ends with (softcap 0 is ignored by the uncapped kernels).
    var variationArguments: [KernelArgument] { [.float(scale), .float(softcap ?? 0), .int32(kernelWindow)] }
}

extension CUDAContext {
    /// Head dimensions with kernels (all paths; the flash kernels where the card's shared memory holds them,
    /// `flashAttentionFits`).
    public static let attentionHeadDims = [32, 64, 96, 128, 256]

    private func checkAttention(_ s: AttentionShape, _ op: String) throws {
        try require(Self.attentionHeadDims.contains(s.headDim), op,
                    "head dimension \(s.headDim) is not supported (\(Self.attentionHeadDims.map(String.init).joined(separator: ", ")))")
        try require(s.scale.isFinite && s.scale > 0, op, "logit scale \(s.scale) is not a positive number")
        if let c = s.softcap { try require(c.isFinite && c > 0, op, "soft-capping \(c) is not a positive number") }
        if let w = s.window { try require(w >= 1, op, "sliding window \(w) is not at least 1") }
        try require(s.kvHeads > 0 && s.heads % s.kvHeads == 0, op, "\(s.heads) query heads cannot share \(s.kvHeads) KV heads")
        try require(s.batch > 0 && s.seq > 0, op, "empty batch")
    }

    /// Shared memory of the flash kernels (attention_mma.cu's fa_forward_shared, and fa_backward_shared up to
    /// d = 128 or fa_backward_wide_shared at 256).
    static func flashForwardShared(_ d: Int) -> Int {
        let keys = d > 128 ? 32 : 64
        return (128 + 4 * keys) * (d + 8) * 2 + 2 * keys * 4
    }
    static func flashBackwardShared(_ d: Int) -> Int {
        d > 128 ? (2 * 64 + 4 * 32) * (d + 8) * 2 + 2 * 64 * 40 * 2 + 4 * 16 * 32 * 4 + 3 * 2 * 32 * 4
                : (2 * 128 + 4 * 64) * (d + 8) * 2 + 128 * 72 * 2 + 3 * 2 * 64 * 4
    }
    /// Shared memory of attention_wgmma.cu's forward (its WG_SHARED): Q and two stages of K and V (128 x 128 values
    /// each), two stages of key segments, and 1024 bytes to start the tiles on the swizzle pattern's 1024-byte boundary.
    static let wgmmaForwardShared = 5 * 128 * 128 * 2 + 2 * 128 * 4 + 1024
    /// Shared memory of the pipelined forward (its WGF_PIPELINED_SHARED): a third stage of V (198,656 bytes).
    static let wgmmaForwardPipelinedShared = 6 * 128 * 128 * 2 + 2 * 128 * 4 + 1024
    /// Shared memory of attention_wgmma.cu's backward (its WGB_SHARED): K and V (128 x 128 values), two stages of Q
    /// and dO (64 x 128), dSᵀ (128 x 64), two stages of lse, delta and query segments (64 each), 1024 bytes of slack.
    static let wgmmaBackwardShared = 2 * 128 * 128 * 2 + 4 * 64 * 128 * 2 + 128 * 64 * 2 + 3 * 2 * 64 * 4 + 1024
    /// Shared memory of the pipelined backward (its WGBP_SHARED): the backward's and two stages of 64 fp32 dQ rows of
    /// 544 bytes (512 and 32 of padding): 219,648 bytes.
    static let wgmmaBackwardPipelinedShared = wgmmaBackwardShared + 2 * 64 * 544

    /// Whether the wgmma forward and backward can run this shape: Hopper kernels (sm_90a cubins: wgmma is not in PTX for
    /// compute_90 nor on other cards), head dimension 128, no soft-capping. Windows and packed segments are supported.
    public func wgmmaAttentionApplies(_ s: AttentionShape) -> Bool {
        let target = compiler.target
        return target.major == 9 && target.minor == 0 && !target.isVirtual && s.headDim == 128 && s.softcap == nil
            && max(Self.wgmmaForwardShared, Self.wgmmaBackwardShared) <= compiler.maxSharedMemoryPerBlock
    }

    /// Threads of a flash forward block: 4 warps of 32 rows, or at d = 256 8 warps of 16 rows (the accumulators of
    /// 32 rows would spill).
    static func flashForwardThreads(_ d: Int) -> Int { d > 128 ? 256 : 128 }
    /// Keys of a flash backward block: 128 (8 warps x 16), or at d = 256 64 (8 warps, pairs splitting the columns).
    static func flashBackwardKeys(_ d: Int) -> Int { d > 128 ? 64 : 128 }

    /// Whether the flash kernels fit this card's shared memory for head dimension `d` (both directions). With
    /// d = 128 the backward needs 155.5 KB: an A100 or H100 has it, an RTX 3090/4090 or L4 (99 KB) does not, and
    /// gets the 64-row tensor-core kernels (static shared memory, under 48 KB). d = 96 needs 123.5 KB (the same cards);
    /// d = 256 132.25 KB forward and 150.75 KB backward (the same cards).
    public func flashAttentionFits(headDim d: Int) -> Bool {
        max(Self.flashForwardShared(d), Self.flashBackwardShared(d)) <= compiler.maxSharedMemoryPerBlock
    }

    /// o = softmax(logits + causal/window/segment mask) v, and lse (per token and head) for the backward; logits are
    /// scale·q·kᵀ, soft-capped when the shape says so.
    /// q, o: [tokens, heads, headDim]; k, v: [tokens, kvHeads, headDim]; segments (optional): [tokens] ids that keep
    /// packed sequences apart. `flash` picks the 128-row flash kernel (default) over the 64-row one (tensor cores only)
    /// where the card's shared memory holds it (`flashAttentionFits`); `kernel` (nil: QLORA_ATTENTION, else mma) picks
    /// the flash forward's instruction family where the wgmma kernel applies (`wgmmaAttentionApplies`): wgmma unless it is .mma
    /// (the pipelined wgmma kernel with .wgmmaPipelined).
    public func attentionForward(q: DeviceBuffer<UInt16>, k: DeviceBuffer<UInt16>, v: DeviceBuffer<UInt16>,
                                 into o: DeviceBuffer<UInt16>, lse: DeviceBuffer<Float>, segments: DeviceBuffer<Int32>? = nil,
                                 shape s: AttentionShape, tensorCores: Bool = true, flash: Bool = true,
                                 kernel: AttentionKernel? = nil, stream: CUDAStream? = nil) throws {
        let op = "attentionForward"
        try checkAttention(s, op)
        try require(q.count >= s.tokens * s.heads * s.headDim && o.count >= q.count && lse.count >= s.tokens * s.heads
                        && k.count >= s.tokens * s.kvHeads * s.headDim && v.count >= k.count, op, "buffers too small")
        let choice = try kernel ?? AttentionKernel.fromEnvironment()
        if tensorCores && flash && choice.forwardOnWGMMA && wgmmaAttentionApplies(s) {
            // Grid as the mma.sync flash forward: (head, batch, query tile of 128), the last tiles first.
            let pipelined = choice.forwardPipelined && Self.wgmmaForwardPipelinedShared <= compiler.maxSharedMemoryPerBlock
            let f = try compiler.function(KernelSources.attentionWGMMA,
                                          pipelined ? "attention_wgmma_forward_pipelined_d128" : "attention_wgmma_forward_d128")
            let shared = pipelined ? Self.wgmmaForwardPipelinedShared : Self.wgmmaForwardShared
            try allowSharedMemory(f, bytes: shared, op)
            try device.launch(f, grid: (s.heads, s.batch, (s.seq + 127) / 128), block: (256, 1, 1),
                              sharedMemory: shared, stream: stream,
                              [q.arg, k.arg, v.arg, o.arg, lse.arg, .pointer(segments?.pointer ?? 0), .int(s.seq), .int(s.heads),
                               .int(s.kvHeads)] + s.variationArguments)
            return
        }
        if tensorCores && flash && flashAttentionFits(headDim: s.headDim) {
            // Grid: (head, batch, query tile); the kernel takes the last query tiles (the longest rows) first.
            let f = try compiler.function(KernelSources.attentionMMA, "attention_fa_forward\(s.kernelSuffix)")
            let shared = Self.flashForwardShared(s.headDim)
            try allowSharedMemory(f, bytes: shared, op)
            try device.launch(f, grid: (s.heads, s.batch, (s.seq + 127) / 128), block: (Self.flashForwardThreads(s.headDim), 1, 1),
                              sharedMemory: shared,
                              stream: stream,
                              [q.arg, k.arg, v.arg, o.arg, lse.arg, .pointer(segments?.pointer ?? 0), .int(s.seq), .int(s.heads),
                               .int(s.kvHeads)] + s.variationArguments)
            return
        }
        let (source, name, threads) = tensorCores ? (KernelSources.attentionMMA, "attention_mma_forward\(s.kernelSuffix)", 128)
                                                  : (KernelSources.attention, "attention_forward\(s.kernelSuffix)", 256)
        try device.launch(compiler.function(source, name),
                          grid: ((s.seq + 63) / 64, s.heads, s.batch), block: (threads, 1, 1), stream: stream,
                          [q.arg, k.arg, v.arg, o.arg, lse.arg, .pointer(segments?.pointer ?? 0), .int(s.seq), .int(s.heads),
                           .int(s.kvHeads)] + s.variationArguments)
    }

    /// dq, dk, dv from dout, given the forward's inputs, output and lse. `delta` is scratch of tokens * heads floats;
    /// `dqAccumulator` (flash kernel only) scratch of tokens * heads * headDim floats (both taken from the allocator
    /// when not given). The flash backward adds dQ with fp32 atomics, so dq can differ in the last bits between runs;
    /// `kernel` (nil: QLORA_ATTENTION) runs it on wgmma where that applies and the choice is .wgmma (or
    /// .wgmmaPipelined: the pipelined wgmma kernel). `flash: false`
    /// (the 64-row kernels, no atomics) gives the same bits every run.
    public func attentionBackward(q: DeviceBuffer<UInt16>, k: DeviceBuffer<UInt16>, v: DeviceBuffer<UInt16>,
                                  o: DeviceBuffer<UInt16>, dout: DeviceBuffer<UInt16>, lse: DeviceBuffer<Float>,
                                  segments: DeviceBuffer<Int32>? = nil, dq: DeviceBuffer<UInt16>, dk: DeviceBuffer<UInt16>,
                                  dv: DeviceBuffer<UInt16>, delta: DeviceBuffer<Float>? = nil,
                                  dqAccumulator: DeviceBuffer<Float>? = nil, shape s: AttentionShape,
                                  tensorCores: Bool = true, flash: Bool = true, kernel: AttentionKernel? = nil,
                                  stream: CUDAStream? = nil) throws {
        let op = "attentionBackward"
        try checkAttention(s, op)
        let qCount = s.tokens * s.heads * s.headDim, kCount = s.tokens * s.kvHeads * s.headDim
        try require([q.count, o.count, dout.count, dq.count].allSatisfy { $0 >= qCount }
                        && [k.count, v.count, dk.count, dv.count].allSatisfy { $0 >= kCount }, op, "buffers too small")
        let rows = s.tokens * s.heads
        let deltaBuffer = try delta ?? allocator.buffer(Float.self, count: rows)
        try require(deltaBuffer.count >= rows, op, "delta scratch too small")
        if tensorCores && flash && flashAttentionFits(headDim: s.headDim) {
            let accumulator = try dqAccumulator ?? allocator.buffer(Float.self, count: qCount)
            try require(accumulator.count >= qCount, op, "dq accumulator scratch too small")
            try device.launch(compiler.function(KernelSources.attentionMMA, "attention_fa_prep"),
                              grid: ((rows * 32 + 255) / 256, 1, 1), block: (256, 1, 1), stream: stream,
                              [o.arg, dout.arg, deltaBuffer.arg, accumulator.arg, .int64(Int64(rows)), .int(s.headDim)])
            // Grid: (batch x KV head, key block); key block 0 (the most query tiles) starts first. Both kernels take the
            // same arguments and add dQ to the accumulator the same way.
            let choice = try kernel ?? AttentionKernel.fromEnvironment()
            let wgmma = choice.backwardOnWGMMA && wgmmaAttentionApplies(s)
            // The pipelined kernel adds dQ rows with 16-byte bulk reductions: it needs the accumulator 16-byte aligned
            // (the allocator's buffers are) and Hopper's shared memory for its dQ staging; else the simple wgmma kernel.
            let pipelined = wgmma && choice.backwardPipelined && accumulator.pointer % 16 == 0
                && Self.wgmmaBackwardPipelinedShared <= compiler.maxSharedMemoryPerBlock
            let f = try pipelined ? compiler.function(KernelSources.attentionWGMMA, "attention_wgmma_backward_pipelined_d128")
                : wgmma ? compiler.function(KernelSources.attentionWGMMA, "attention_wgmma_backward_d128")
                : compiler.function(KernelSources.attentionMMA, "attention_fa_backward\(s.kernelSuffix)")
            let shared = pipelined ? Self.wgmmaBackwardPipelinedShared : wgmma ? Self.wgmmaBackwardShared
                : Self.flashBackwardShared(s.headDim)
            try allowSharedMemory(f, bytes: shared, op)
            let keys = wgmma ? 128 : Self.flashBackwardKeys(s.headDim)
            try device.launch(f, grid: (s.batch * s.kvHeads, (s.seq + keys - 1) / keys, 1), block: (256, 1, 1), sharedMemory: shared,
                              stream: stream,
                              [q.arg, k.arg, v.arg, dout.arg, lse.arg, deltaBuffer.arg, .pointer(segments?.pointer ?? 0),
                               accumulator.arg, dk.arg, dv.arg, .int(s.seq), .int(s.heads), .int(s.kvHeads)] + s.variationArguments)
            try device.launch(compiler.function(KernelSources.attentionMMA, "attention_fa_dq"),
                              grid: (min((qCount / 4 + 255) / 256, 4096), 1, 1), block: (256, 1, 1), stream: stream,
                              [accumulator.arg, dq.arg, .int64(Int64(qCount)), .float(s.scale)])
            return
        }
        try device.launch(compiler.function(KernelSources.attention, "attention_backward_delta"),
                          grid: ((rows * 32 + 255) / 256, 1, 1), block: (256, 1, 1), stream: stream,
                          [o.arg, dout.arg, deltaBuffer.arg, .int64(Int64(rows)), .int(s.headDim)])
        let common: [KernelArgument] = [q.arg, k.arg, v.arg, dout.arg, lse.arg, deltaBuffer.arg, .pointer(segments?.pointer ?? 0)]
        let tail: [KernelArgument] = [.int(s.seq), .int(s.heads), .int(s.kvHeads)] + s.variationArguments
        let (source, prefix, threads) = tensorCores ? (KernelSources.attentionMMA, "attention_mma_backward", 128)
                                                    : (KernelSources.attention, "attention_backward", 256)
        try device.launch(compiler.function(source, "\(prefix)_dq\(s.kernelSuffix)"),
                          grid: ((s.seq + 63) / 64, s.heads, s.batch), block: (threads, 1, 1), stream: stream,
                          common + [dq.arg] + tail)
        try device.launch(compiler.function(source, "\(prefix)_dkdv\(s.kernelSuffix)"),
                          grid: ((s.seq + 63) / 64, s.kvHeads, s.batch), block: (threads, 1, 1), stream: stream,
                          common + [dk.arg, dv.arg] + tail)
    }
}
