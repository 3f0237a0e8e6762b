// What a GPU training run holds in device memory, computed before anything is allocated, so that running out of
// memory is an error that shows the plan and says what to lower instead of a failed cuMemAlloc deep in a step.
//
// Device memory, N = tokens of a step, H = hidden, I = intermediate, L = blocks, V = vocabulary (bf16 unless said):
//   weights      NF4 linears + absmax, the head [V, H], the embedding [V, H] unless it lives on the host (untied,
//                `hostEmbedding`), the norms
//   adapters     LoRA: fp32 masters + fp32 gradients + bf16 copies
//   optimizer    by the optimizer in use (CUDAOptimizer's layout, one region per LoRA tensor): adamw two fp32 moments;
//                adamw_8bit two bytes per value and two fp32 absmax per 256 (tensors under 4096 values: fp32), and
//                the two 8-bit code maps; the paged kinds keep all of it in pinned host memory and hold on the
//                device only two slots of the largest tensor's state that it streams through (70B, r 16: 1.63 GiB of
//                device memory that paged_adamw_8bit does not need). Without a kind (nil), the trainer's own fp32 AdamW
//                (`CUDADecoderTrainer.optimizerStep`): two fp32 moments over the flat buffers.
//   activations  gradient checkpoints: L + 1 of [N, H], or `checkpointSlots` of them when offloaded (the others
//                wait in pinned host memory); one block's working set: 5 [N, H], q, attended, k, v, one shared
//                region for the MLP's gate/up/activated (3 [N, I]) that the attention backward's dA, dq, dk, dv
//                reuse once the MLP's backward is done, and the loss's logits chunk between the forward and the
//                backward (BlockScratchLayout), lse and delta (fp32), x·Aᵀ of one block's seven linears
//                (recomputed before each block's backward, so shared by all blocks), dy·B, under dropout the fused
//                dA's fp32 partial sums, every block's own d(x)·Aᵀ (kept from the forward, so the recomputation does
//                not hash the mask again: L·Σ 2·N·r, r/H of the checkpoints per linear) and the masks as bits
//                (CUDALoRADropout.swift; d(x) itself is never stored): every block's, kept from the forward to the
//                backward so that a step hashes each mask once (L·Σ N·in/8, `keepDropoutMasks`), or one linear's,
//                hashed again by the backward; the families'
//                variations add q and k before their norms, o_proj's and down_proj's outputs before Gemma's
//                sandwich norms, Phi-3's fused projection output before its split; the folded LoRA (forward) widens
//                norm1, norm2 and activated by their x·Aᵀ columns, the backward's fold the residual gradient by R and
//                gate and up by R' columns (LoRABackwardFold) and each folded weight scratch by r rows
//   workspace    the bf16 scratch a linear weight is dequantized into, cuBLASLt's workspace; with
//                `keepBlockWeights` one scratch per linear of a block (8B: 7 weights, 436 MB instead of 117 MB), so the
//                weights the recomputation dequantizes serve the block's backward too (only down_proj's, which the
//                recomputation skips, is dequantized again): 14 dequantizations a block per step instead of 20. The
//                trainer drops back to the one scratch when the plan with them does not fit (`withoutBlockWeights`).
// With the base sharded over W ranks (`shardedOver`), each rank's weights hold, instead of the NF4 linears, its
// shard of every block (ShardedBlockLayout: 1/W of the block's bytes, padded to 16 per shard) and two staging buffers
// of one whole block (the block in use and the next one being gathered); the embedding, head and norms stay whole on
// every rank (bf16: the head of a 70B model is 2 × 128,256 × 8,192 bytes = 2 GiB, the same as 1/40 of its blocks).
// With the adapters sharded as ZeRO-2 over W ranks (`adaptersShardedOver`, CUDATrainingEngine's header), the optimizer
// state is that of the rank owning the most state (ownership by whole tensors, AdapterOwnership), and the adapters
// hold the fp32 masters and gradients of the largest rank's span of the flat layout (LoRAFlatLayout.ownerSpans), the
// whole bf16 copies and two fp32 gradient buckets of the largest block's elements (`gradientBuckets`); over more than
// one rank the forward's fold is off (it reads fp32 B of every linear).
// With the head sharded by vocabulary over W ranks (`headShardedOver`, CUDADecoderTrainer+VocabularyParallelHead.swift):
// the weights hold the largest rank's slice of the head [⌈V/W⌉, H] instead of [V, H] (tied embeddings: the table stays
// whole), and the activations the exchange's buffers (`headExchange`): the gathered normed rows [W·N, H], of which
// norm1 is the start, so (W − 1)·N·H more; targets and lse [W·N], the statistics [W][W·N][3] in fp32, and one loss
// chunk of fp32 d(normed) [lossChunkRows, H].
// Host memory (not in `total`): the offloaded checkpoints (pinned), the embedding table and its pinned staging
// buffer for one step's rows, a paged optimizer's state (pinned).
// The optional savers of speed (`keepBlockWeights`, then `keepDropoutMasks`) are dropped by one rule, `fitting`,
// which the trainer, `qlora plan` and the longest-sequence / largest-batch searches share.

/// Where the GPU trainer keeps what a step does not need on the GPU all the time.
public struct CUDATrainerMemoryOptions: Sendable, Equatable, CustomStringConvertible {
    /// Keep the gradient checkpoints (every block's input) in pinned host memory: copied out after the forward
    /// makes them, copied back ahead of the backward, on a second stream, through `checkpointSlots` device buffers.
    public var offloadCheckpoints: Bool
    /// Device buffers the checkpoints rotate through when offloaded (at least 2; with 3 every copy has two blocks'
    /// compute to hide behind).
    public var checkpointSlots: Int
    /// Keep an untied input embedding in host memory: the step's rows are gathered on the host into a pinned
    /// buffer and uploaded (the embedding is frozen). A tied embedding stays on the GPU (the head reads it).
    public var hostEmbedding: Bool
    /// Under LoRA dropout, keep every block's masks as bits (one bit per element of each adapter's input) from the
    /// forward, which hashes them, to the backward, which reads them; else the backward hashes them again (hashing
    /// is most of what dropout costs). The trainer turns it off when the bits do not fit.
    public var keepDropoutMasks: Bool
    /// Keep each linear's dequantized weight of a block from its recomputation to its backward (one bf16 scratch
    /// per linear), when the plan has room for it: the same bits reach the same GEMMs, with fewer dequantizations.
    public var keepBlockWeights: Bool
    /// Keep every block's attention output o and its log-sum-exp from the forward to the block's backward, so the
    /// recomputation before it skips the attention forward (a third of the attention's time, most of a long
    /// sequence's step): with offloaded checkpoints they go to pinned host memory beside them through two device
    /// slots; without, each block keeps its own on the GPU.
    public var keepAttentionOutputs: Bool
    /// Fold the LoRA rank-r products into the base GEMMs by concatenating along K (LoRAFoldLayout.swift): the inputs
    /// of q, k, v, gate, up and down get rows of in + R values (their x·Aᵀ after x), each weight scratch rows of
    /// in + its tail (W, then s·B), and y is written once by one GEMM (o_proj apart; the backward's s·dyB·A apart).
    public var foldLoRA: Bool
    /// Fold the backward's rank-r product into the base dx GEMM (LoRAFoldLayout.swift, LoRABackwardFold):
    /// dx = [dy | s·dy·B]·[W ; A] for o_proj and down_proj, whose dy (the residual gradient) gets rows of hidden + R,
    /// and gate_proj and up_proj, whose outputs (their dy's buffers) get rows of I + R'; each folded weight scratch
    /// r more rows. On by default since session 10 (`automatic(for:)`); a plan with LoRA dropout turns it off.
    public var foldLoRABackward: Bool

    public init(offloadCheckpoints: Bool, checkpointSlots: Int = 3, hostEmbedding: Bool, keepDropoutMasks: Bool = true,
                keepBlockWeights: Bool = true, keepAttentionOutputs: Bool = false, foldLoRA: Bool = false,
                foldLoRABackward: Bool = false) {
        self.foldLoRA = foldLoRA
        self.foldLoRABackward = foldLoRABackward
        self.offloadCheckpoints = offloadCheckpoints
        self.checkpointSlots = checkpointSlots
        self.hostEmbedding = hostEmbedding
        self.keepDropoutMasks = keepDropoutMasks
        self.keepBlockWeights = keepBlockWeights
        self.keepAttentionOutputs = keepAttentionOutputs
    }

    /// Everything on the GPU.
    public static let allOnDevice = CUDATrainerMemoryOptions(offloadCheckpoints: false, hostEmbedding: false)

    /// The default: offload the checkpoints when there are more of them than slots, keep an untied embedding on
    /// the host; neither every block's dropout masks nor a block's dequantized weights are kept (measured on the
    /// H100, 8B shape at 2 × 2048, session 7: each gains under 1% of tokens/s, within the run-to-run spread, for
    /// 0.62 and 0.30 GiB, which would put the 7B and 8B shapes above Unsloth's peak memory; `--keep-dropout-masks on`
    /// and `--keep-block-weights on` choose them). With offloaded checkpoints the blocks' attention outputs are
    /// kept (offloaded too: +4.3% / +7.6% tokens/s on the 8B / 1B shapes at 2 / 4 × 2048, +22% at 1 × 32,768, for
    /// one more [N, q] slot on the GPU), and LoRA is folded into the base GEMMs (+1.2% / +4.5%); session 8, H100.
    /// The backward's fold too: +0.4-0.8% / +0.9-1.5% on the 8B / 1B shapes, the peak unchanged to 0.01 GiB (session
    /// 10, H100, two interleaved runs of each).
    public static func automatic(for c: DecoderConfig) -> CUDATrainerMemoryOptions {
        let offload = c.layerCount + 1 > 3
        return CUDATrainerMemoryOptions(offloadCheckpoints: offload, checkpointSlots: 3, hostEmbedding: !c.tieWordEmbeddings,
                                        keepDropoutMasks: false, keepBlockWeights: false, keepAttentionOutputs: offload, foldLoRA: true,
                                        foldLoRABackward: true)
    }

    /// Device buffers the trainer holds for checkpoints with `layers` blocks.
    func deviceCheckpoints(layers: Int) -> Int {
        offloadCheckpoints ? min(max(checkpointSlots, 2), layers + 1) : layers + 1
    }

    /// Device buffers for the blocks' attention outputs (o and lse): one without `keepAttentionOutputs` (the block
    /// in hand's), two when they are offloaded, one per block when they stay on the GPU.
    func attentionOutputSlots(layers: Int) -> Int {
        keepAttentionOutputs ? (offloadCheckpoints ? min(2, layers) : max(layers, 1)) : 1
    }

    /// Blocks whose attention outputs go to host memory: those whose slot a later block's forward overwrites.
    func offloadedAttentionOutputs(layers: Int) -> Int {
        keepAttentionOutputs && offloadCheckpoints ? max(layers - 2, 0) : 0
    }

    /// Checkpoints x₀ … x_{count−1} that go to host memory: those the backward finds overwritten (the last
    /// slots − 1 block inputs and the final output stay in their slots until used).
    func offloadedCheckpoints(layers: Int) -> Int {
        offloadCheckpoints ? max(0, layers + 1 - deviceCheckpoints(layers: layers)) : 0
    }

    public var description: String {
        "checkpoints " + (offloadCheckpoints ? "offloaded to host (\(checkpointSlots) GPU slots)" : "on the GPU")
            + ", embedding " + (hostEmbedding ? "on the host" : "on the GPU")
            + (keepBlockWeights ? ", a block's dequantized weights kept for its backward" : "")
            + (keepAttentionOutputs ? ", attention outputs kept" + (offloadCheckpoints ? " (offloaded)" : "") : "")
            + (foldLoRA ? ", LoRA folded into the base GEMMs" : "")
            + (foldLoRABackward ? ", the LoRA backward folded into dx (o, gate, up, down)" : "")
    }
}

/// Where one block's large working buffers sit in one allocation (element offsets, each on a 256-byte boundary),
/// in three phases that never overlap in time:
///   the MLP's gate, up and activated [N, I] (a block's forward, recomputation, and its backward up to the MLP's);
///   the attention backward's dA (d/d attended), dq [N, q], dk and dv [N, kv] and the fp32 dQ accumulator of the
///   flash backward [N, q] (the rest of the block's backward);
///   one loss chunk's logits [rows, V] (between the last block's forward and the first backward, and evaluation).
/// The loss chunk takes as many rows as the MLP's region holds (a multiple of 64), at most 256 MiB of logits, but at
/// least 512 rows (fewer would make the two head GEMMs re-read the [V, H] head too often for their arithmetic):
/// only then does the region grow for it.
struct BlockScratchLayout: Equatable {
    var gate = 0, up = 0, activated = 0
    var dAttended = 0, dq = 0, dk = 0, dv = 0
    /// The fp32 dQ accumulator, in bf16 elements from the start (n * q floats).
    var dqAccumulator = 0
    /// Rows of logits per cross-entropy chunk (at offset 0).
    var lossChunkRows = 0
    /// Elements of the whole region (the largest of the three phases).
    var count = 0

    /// `foldedColumns`: x·Aᵀ columns after each row of `activated` (folded LoRA: down_proj's R; rows of I + R).
    /// `gateColumns`: spare columns after each row of gate and up (the backward's fold: s·dy·B; rows of I + R').
    init(config c: DecoderConfig, tokens n: Int, foldedColumns: Int = 0, gateColumns: Int = 0) {
        var end = 0
        func take(_ elements: Int) -> Int {
            let start = end
            end = (end + elements + 127) / 128 * 128
            return start
        }
        gate = take(n * (c.intermediateSize + gateColumns))
        up = take(n * (c.intermediateSize + gateColumns))
        activated = take(n * (c.intermediateSize + foldedColumns))
        let mlp = end
        end = 0
        dAttended = take(n * c.qDim)
        dq = take(n * c.qDim)
        dk = take(n * c.kvDim)
        dv = take(n * c.kvDim)
        dqAccumulator = take(2 * n * c.qDim)
        let shared = max(mlp, end)
        let vocab = max(c.vocabularySize, 1)
        let fitting = min(shared / vocab, (256 << 20) / (2 * vocab)) / 64 * 64
        lossChunkRows = min(max(fitting, 512), max(n, 1))
        count = max(shared, (lossChunkRows * vocab + 127) / 128 * 128)
    }
}

/// Bytes the GPU trainer will allocate, by kind.
public struct CUDAMemoryPlan: Sendable, CustomStringConvertible {
    /// NF4 codes + double-quantized absmax of the linear layers, bf16 head, embedding (unless on the host), norms.
    public var weights: Int
    /// LoRA matrices: fp32 master, bf16 compute copy, fp32 gradients (ZeRO-2: this rank's masters and gradients, and
    /// the two gradient buckets).
    public var adapters: Int
    /// ZeRO-2: the two gradient buckets of the largest block (part of `adapters`; 0 when the masters are whole).
    public var gradientBuckets: Int = 0
    /// ZeRO-2: elements of the largest rank's span of fp32 masters (and gradients); nil when they are whole.
    public var ownedAdapterElements: Int?
    /// Optimizer state on the device, by `optimizerKind` (a paged kind: only the two slots it streams through).
    public var optimizer: Int
    /// The optimizer the plan counts (nil: the trainer's own fp32 AdamW, `CUDADecoderTrainer.optimizerStep`).
    public var optimizerKind: OptimizerKind?
    /// Bytes of a paged optimizer's state in pinned host memory (part of `host`; 0 for the other kinds).
    public var optimizerHost: Int = 0
    /// Gradient checkpoints on the GPU (all, or the offload slots) plus one block's working activations and gradients.
    public var activations: Int
    /// The bf16 scratch a linear weight is dequantized into (one per linear of a block with
    /// `memory.keepBlockWeights`), cuBLASLt's workspace.
    public var workspace: Int
    /// Bytes of `workspace` that keeping a block's dequantized weights adds to one weight's scratch (0 without).
    public var blockWeightBytes: Int
    /// Host memory: offloaded checkpoints and the embedding's staging buffer (pinned), the embedding table.
    public var host: Int
    /// Where the checkpoints and the embedding live.
    public var memory: CUDATrainerMemoryOptions
    /// Device bytes of the gradient checkpoints (part of `activations`).
    public var checkpoints: Int
    /// The ranks the base is sharded over (1: not sharded).
    public var shardedWorld: Int = 1
    /// With a sharded base: this rank's shards of the blocks and the two staging buffers (part of `weights`).
    public var baseShards: Int = 0
    public var baseStaging: Int = 0
    /// The ranks the adapters are sharded over as ZeRO-2 (1: not sharded): the optimizer state is the largest rank's
    /// own tensors' (CUDATrainingEngine's header; ownership by `AdapterOwnership`).
    public var adapterShardedWorld: Int = 1
    /// The ranks the head is sharded over by vocabulary (1: whole; CUDADecoderTrainer+VocabularyParallelHead.swift).
    public var headShardedWorld: Int = 1
    /// With the head sharded: the largest rank's slice of it (part of `weights`; with tied embeddings 0, the slice
    /// being a view into the whole table) and what its exchange adds to the activations: the other ranks' normed rows
    /// beyond norm1, the gathered targets, the statistics, lse and one chunk of fp32 d(normed).
    public var headSlice: Int = 0
    public var headExchange: Int = 0

    /// What the plan was made for, so that `fitting` can plan again with fewer savers.
    struct Request: Sendable {
        var config: DecoderConfig
        var tokens: Int
        var ranks: [[Int]]
        var dropout: Bool
        var world: Int?
        var optimizer: OptimizerKind?
        var adapterWorld: Int?
        var headWorld: Int?
    }
    var request: Request

    /// The trainer's flat LoRA layout for this plan's ranks (ZeRO-2's spans come from it).
    public var loraLayout: LoRAFlatLayout { LoRAFlatLayout(shapes: Self.linearShapes(request.config), ranks: request.ranks) }

    /// Device memory: everything but `host`.
    public var total: Int { weights + adapters + optimizer + activations + workspace }

    /// Each linear layer's [out, in] shape in the order the trainer stores them.
    /// q, k, v, o, gate, up, down; or Phi-3's qkv [q + 2kv, H], o, gate_up [2I, H], down.
    static func linearShapes(_ c: DecoderConfig) -> [(out: Int, in: Int)] {
        if c.fusedProjections {
            return [(c.qDim + 2 * c.kvDim, c.hiddenSize), (c.hiddenSize, c.qDim), (2 * c.intermediateSize, c.hiddenSize),
                    (c.hiddenSize, c.intermediateSize)]
        }
        return [(c.qDim, c.hiddenSize), (c.kvDim, c.hiddenSize), (c.kvDim, c.hiddenSize), (c.hiddenSize, c.qDim),
                (c.intermediateSize, c.hiddenSize), (c.intermediateSize, c.hiddenSize), (c.hiddenSize, c.intermediateSize)]
    }

    /// Element offsets of each linear's dequantized weight in the scratch that keeps a block's weights (each on a
    /// 256-byte boundary), and the scratch's elements.
    /// `columns[j]`: linear j's row length in its scratch (folded LoRA: LoRAFoldLayout.widestK; default `in`).
    /// `extraRows[j]`: rows past `out` (the backward's fold: A under W; default none).
    static func blockWeightSlots(_ c: DecoderConfig, columns: [Int]? = nil, extraRows: [Int]? = nil) -> (offsets: [Int], count: Int) {
        var end = 0
        let offsets = linearShapes(c).enumerated().map { (j, shape) -> Int in
            let start = end
            end = (end + (shape.out + (extraRows?[j] ?? 0)) * (columns?[j] ?? shape.in) + 127) / 128 * 128
            return start
        }
        return (offsets, end)
    }

    /// This plan with one weight's scratch instead of a block's (`keepBlockWeights` off).
    public func withoutBlockWeights() -> CUDAMemoryPlan {
        var plan = self
        plan.workspace -= blockWeightBytes
        plan.blockWeightBytes = 0
        plan.memory.keepBlockWeights = false
        return plan
    }

    /// This plan with the dropout masks hashed again by the backward instead of every block's kept from the forward
    /// (`keepDropoutMasks` off).
    public func withoutKeptDropoutMasks() -> CUDAMemoryPlan {
        var options = memory
        options.keepDropoutMasks = false
        return replanned(memory: options)
    }

    /// The same request planned again with other options, sharding or optimizer (what a saving is measured against).
    public func replanned(memory options: CUDATrainerMemoryOptions? = nil, shardedOver world: Int?? = nil,
                          optimizer kind: OptimizerKind?? = nil, dropout: Bool? = nil, adaptersShardedOver adapterWorld: Int?? = nil,
                          headShardedOver headWorld: Int?? = nil) -> CUDAMemoryPlan {
        let r = request
        return CUDAMemoryPlan(config: r.config, tokens: r.tokens, ranks: r.ranks, dropout: dropout ?? r.dropout, memory: options ?? memory,
                              shardedOver: world ?? r.world, optimizer: kind ?? r.optimizer, adaptersShardedOver: adapterWorld ?? r.adapterWorld,
                              headShardedOver: headWorld ?? r.headWorld)
    }

    /// The one rule for the optional savers of time that cost memory: while the plan does not fit the budget, drop
    /// a block's kept dequantized weights first (0.30 GiB on the 8B shape, under 1% of tokens/s), then every block's
    /// kept dropout masks (0.62 GiB there), last the kept attention outputs (one [N, q] slot: 4–22% of tokens/s,
    /// so a long sequence that fits only without it still trains). The trainer, `qlora plan` and the searches all
    /// plan through it. `hostBytes` (the trainer: three quarters of the machine's RAM): the kept attention outputs,
    /// which double the pinned host memory of offloaded checkpoints, are dropped too when the host would not hold them.
    public func fitting(budgetBytes: Int, contextBytes: Int = CUDAMemoryPlan.typicalContextBytes, hostBytes: Int? = nil) -> CUDAMemoryPlan {
        var plan = self
        if plan.memory.keepBlockWeights && !plan.fits(budgetBytes: budgetBytes, contextBytes: contextBytes) {
            plan = plan.withoutBlockWeights()
        }
        if plan.request.dropout && plan.memory.keepDropoutMasks && !plan.fits(budgetBytes: budgetBytes, contextBytes: contextBytes) {
            plan = plan.withoutKeptDropoutMasks()
        }
        if plan.memory.keepAttentionOutputs
            && (!plan.fits(budgetBytes: budgetBytes, contextBytes: contextBytes) || hostBytes.map { plan.host > $0 } == true) {
            var options = plan.memory
            options.keepAttentionOutputs = false
            plan = plan.replanned(memory: options)
        }
        return plan
    }

    /// Device and host bytes of the optimizer state for LoRA tensors of `tensors` values each, as CUDAOptimizer
    /// allocates it (kind nil: the trainer's two fp32 moments over `flatCount` values).
    static func optimizerBytes(_ kind: OptimizerKind?, tensors: [Int], flatCount: Int) -> (device: Int, host: Int) {
        let s = DeviceAllocator.sizeClass
        guard let kind else { return (2 * s(4 * flatCount), 0) }
        let regions = tensors.map { CUDAOptimizer.TensorState.bytes(count: $0, is8bit: kind.is8bit && $0 >= AdamW8bit.minimum8bitSize) }
        // The signed and unsigned code maps (256 fp32 each), uploaded once some tensor has 8-bit state.
        let maps = kind.is8bit && tensors.contains(where: { $0 >= AdamW8bit.minimum8bitSize }) ? 2 * s(4 * 256) : 0
        switch kind {
        case .adamw, .adamw8bit:
            return (regions.reduce(0) { $0 + s($1) } + maps, 0)
        case .pagedAdamw8bit, .pagedAdamw32bit:
            // Two slots of the largest tensor's state, which the state streams through (CUDAOptimizer's header).
            return (2 * (regions.max().map(s) ?? 0) + maps, regions.reduce(0, +))
        }
    }

    /// Columns of the widest fused projection output (Phi-3's qkv_proj or gate_up_proj), split after its GEMM.
    static func fusedWidth(_ c: DecoderConfig) -> Int { max(c.qDim + 2 * c.kvDim, 2 * c.intermediateSize) }

    /// Bytes of one NF4 weight of `n` values with blocksize 64 and nested blocksize 256 (rounded up per buffer).
    static func nf4Bytes(_ n: Int) -> Int {
        let blocks = (n + 63) / 64
        return DeviceAllocator.sizeClass((n + 1) / 2) + DeviceAllocator.sizeClass(blocks)
            + DeviceAllocator.sizeClass(4 * ((blocks + 255) / 256))
    }

    /// The largest LoRA rank of linear j (q, k, v, o, gate, up, down) over the blocks: the x·Aᵀ buffer of that
    /// linear, shared by all blocks, is sized by it.
    static func largestRanks(_ ranks: [[Int]]) -> [Int] {
        (0..<(ranks.map(\.count).max() ?? 0)).map { j in ranks.map { j < $0.count ? $0[j] : 0 }.max() ?? 0 }
    }

    /// fp32 elements of the fused LoRA dropout's dA scratch, shared by all linears: the largest
    /// `CUDAContext.loraDropoutScratchCount` of a linear at `tokens`.
    static func dropoutScratchCount(tokens n: Int, shapes: [(out: Int, in: Int)], ranks: [[Int]]) -> Int {
        let largest = largestRanks(ranks)
        let counts = shapes.indices.map { CUDAContext.loraDropoutScratchCount(tokens: n, inFeatures: shapes[$0].in, rank: largest[$0]) }
        return max(1, counts.max() ?? 1)
    }

    /// Bytes of the fused dropout's mask bits: one linear's [tokens, in] at one bit per element, the widest input.
    static func dropoutMaskBytes(tokens n: Int, shapes: [(out: Int, in: Int)]) -> Int {
        max(1, shapes.map { CUDAContext.loraDropoutMaskBytes(tokens: n, inFeatures: $0.in) }.max() ?? 1)
    }

    /// Where every adapter's mask bits sit in the one buffer that keeps them from the forward to the backward
    /// (`keepDropoutMasks`): byte offsets by block and linear (nil: no adapter), each [tokens, ⌈in/8⌉] bytes on a
    /// 256-byte boundary, and the buffer's bytes.
    static func keptMaskLayout(tokens n: Int, shapes: [(out: Int, in: Int)], ranks: [[Int]]) -> (offsets: [[Int?]], bytes: Int) {
        var end = 0
        let offsets = ranks.map { layer in
            layer.indices.map { j -> Int? in
                guard layer[j] > 0, j < shapes.count else { return nil }
                let start = end
                end += (CUDAContext.loraDropoutMaskBytes(tokens: n, inFeatures: shapes[j].in) + 255) / 256 * 256
                return start
            }
        }
        return (offsets, max(end, 1))
    }

    /// The plan for LoRA rank `r` on every projection.
    public init(config c: DecoderConfig, tokens n: Int, rank r: Int, dropout: Bool = false, memory: CUDATrainerMemoryOptions? = nil,
                shardedOver world: Int? = nil, optimizer: OptimizerKind? = nil, adaptersShardedOver adapterWorld: Int? = nil,
                headShardedOver headWorld: Int? = nil) {
        self.init(config: c, tokens: n, ranks: Array(repeating: Array(repeating: r, count: Self.linearShapes(c).count), count: c.layerCount),
                  dropout: dropout, memory: memory, shardedOver: world, optimizer: optimizer, adaptersShardedOver: adapterWorld,
                  headShardedOver: headWorld)
    }

    /// The sharded layout of one block's NF4 linears over `world` ranks (every block has the same shapes).
    static func shardedBlockLayout(_ c: DecoderConfig, world: Int) -> ShardedBlockLayout? {
        try? ShardedBlockLayout(skeletons: linearShapes(c).map { ShardedBlockLayout.nf4Skeleton(rows: $0.out, columns: $0.in) },
                                worldSize: max(world, 1))
    }

    /// The plan for `ranks[l][j]`, the LoRA rank of block l's linear j (q, k, v, o, gate, up, down); `dropout`: some
    /// linear drops out (the fused dropout's fp32 dA scratch); `memory`: where checkpoints and the embedding
    /// live (nil: `CUDATrainerMemoryOptions.automatic(for:)`; a tied embedding stays on the GPU whatever it says);
    /// `optimizer`: the kind whose state is counted (nil: the trainer's own fp32 AdamW). `adaptersShardedOver`: that
    /// optimizer steps only this rank's LoRA tensors of adapters sharded over so many ranks (ZeRO-2); the plan counts
    /// the state of the rank that holds the most. `headShardedOver`: the head sharded by vocabulary over so many ranks
    /// (the largest slice, and the buffers of the exchange: `VocabularyParallelHeadLayout`).
    public init(config c: DecoderConfig, tokens n: Int, ranks: [[Int]], dropout: Bool = false, memory: CUDATrainerMemoryOptions? = nil,
                shardedOver world: Int? = nil, optimizer: OptimizerKind? = nil, adaptersShardedOver adapterWorld: Int? = nil,
                headShardedOver headWorld: Int? = nil) {
        request = Request(config: c, tokens: n, ranks: ranks, dropout: dropout, world: world, optimizer: optimizer, adapterWorld: adapterWorld,
                          headWorld: headWorld)
        optimizerKind = optimizer
        var memory = memory ?? .automatic(for: c)
        if c.tieWordEmbeddings { memory.hostEmbedding = false }
        // Under LoRA dropout no linear folds its backward (LoRABackwardFold), so its spare columns and A's rows would
        // be memory for nothing: the trainer, which allocates by this plan, leaves the fold off.
        if dropout { memory.foldLoRABackward = false }
        // ZeRO-2 masters over several ranks: no rank holds every linear's fp32 B, which the forward's fold reads.
        let shardsMasters = adapterWorld != nil && optimizer != nil
        if shardsMasters && (adapterWorld ?? 1) > 1 { memory.foldLoRA = false }
        self.memory = memory
        let s = DeviceAllocator.sizeClass
        let shapes = Self.linearShapes(c)
        var w = 0
        var largest = 0
        for (out, inF) in shapes {
            w += Self.nf4Bytes(out * inF)
            largest = max(largest, out * inF)
        }
        w *= c.layerCount
        if let world, let layout = Self.shardedBlockLayout(c, world: world) {
            shardedWorld = world
            baseShards = c.layerCount * s(layout.shardBytes)
            baseStaging = 2 * s(layout.paddedBytes)
            w = baseShards + baseStaging
        }
        // The trainer's flat LoRA buffers: every A and B on a multiple of 128 elements (LoRAFlatLayout).
        let flat = LoRAFlatLayout(shapes: shapes, ranks: ranks)
        let loraParameters = flat.count
        let tensors = flat.tensorCounts  // A and B of every adapter, in the optimizer's order
        let xa = Self.largestRanks(ranks).reduce(0) { $0 + s(2 * n * $1) }
        let maxRank = ranks.joined().max() ?? 0
        let table = s(2 * c.vocabularySize * c.hiddenSize)
        // The head: whole, or the largest rank's slice of it (tied: a view into the table).
        let foldColumns = memory.foldLoRA ? LoRAFoldLayout.widestColumns(c, ranks: ranks) : [0, 0, 0]
        let headLayout = headWorld.map { VocabularyParallelHeadLayout(config: c, tokens: n, worldSize: $0, normColumns: c.hiddenSize + foldColumns[0]) }
        if let headWorld, let headLayout {
            headShardedWorld = headWorld
            headSlice = c.tieWordEmbeddings ? 0 : s(2 * headLayout.headSlice)
        }
        w += table * (c.tieWordEmbeddings || !memory.hostEmbedding ? 1 : 0) + (c.tieWordEmbeddings ? 0 : headLayout == nil ? table : headSlice)
            + ((c.sandwichNorms ? 4 : 2) * c.layerCount + 1) * s(2 * c.hiddenSize) + (c.qkNorm ? 2 * c.layerCount * s(2 * c.headDim) : 0)
        weights = w
        adapters = s(4 * loraParameters) * 2 + s(2 * loraParameters)
        if shardsMasters, let adapterWorld {
            // Each rank allocates its span (at least one element) twice and the buckets; the largest rank's counted.
            let owned = max(flat.ownerSpans(worldSize: adapterWorld).map(\.count).max() ?? 0, 1)
            ownedAdapterElements = owned
            gradientBuckets = 2 * s(4 * max(flat.largestBlock, 1))
            adapters = 2 * s(4 * owned) + s(2 * loraParameters) + gradientBuckets
        }
        var state = Self.optimizerBytes(optimizer, tensors: tensors, flatCount: loraParameters)
        if let adapterWorld, adapterWorld > 1, optimizer != nil {
            // ZeRO-2: each rank's optimizer holds its own tensors' state (the trainer's own AdamW is never sharded).
            adapterShardedWorld = adapterWorld
            let ownership = AdapterOwnership(counts: tensors, worldSize: adapterWorld)
            let perRank = ownership.ranges.map { Self.optimizerBytes(optimizer, tensors: Array(tensors[$0]), flatCount: 0) }
            state = (perRank.map(\.device).max() ?? 0, perRank.map(\.host).max() ?? 0)
        }
        self.optimizer = state.device
        optimizerHost = state.host
        let h = 2 * n * c.hiddenSize, q = 2 * n * c.qDim, kv = 2 * n * c.kvDim
        // x·Aᵀ of one block's linears, dy·B, and the fused dropout's dA scratch.
        let droppedXA = ranks.joined().reduce(0) { $0 + ($1 > 0 ? s(2 * n * $1) : 0) }
        let maskBits = memory.keepDropoutMasks ? Self.keptMaskLayout(tokens: n, shapes: shapes, ranks: ranks).bytes
            : Self.dropoutMaskBytes(tokens: n, shapes: shapes)
        let lora = xa + s(2 * n * maxRank)
            + (dropout ? s(4 * Self.dropoutScratchCount(tokens: n, shapes: shapes, ranks: ranks)) + s(maskBits) + droppedXA : 0)
        checkpoints = memory.deviceCheckpoints(layers: c.layerCount) * s(h)
        // Folded LoRA: norm1, norm2 and activated have rows of in + R, each weight scratch rows of its widest K.
        let weightColumns = memory.foldLoRA ? LoRAFoldLayout.widestK(c, ranks: ranks) : shapes.map(\.in)
        // The backward's fold: the residual gradient's rows of hidden + R, r rows of A under o's and down's W.
        let backwardFold = LoRABackwardFold(config: c, ranks: ranks, enabled: memory.foldLoRABackward)
        largest = shapes.indices.map { (shapes[$0].out + backwardFold.extraRows[$0]) * weightColumns[$0] }.max() ?? largest
        let n1 = 2 * n * (c.hiddenSize + foldColumns[0]), n2 = 2 * n * (c.hiddenSize + foldColumns[1])
        let scratch = BlockScratchLayout(config: c, tokens: n, foldedColumns: foldColumns[2], gateColumns: backwardFold.mlpColumns)
        // norm1, hidden, norm2, gradient, dNorm; q, attended; k, v; the shared MLP / attention-gradient / logits region;
        // lse, delta; rowLoss, token ids, targets, positions, segments.
        // The variations' buffers: q and k before their norms; o_proj's and down_proj's outputs before the sandwich
        // norms; a fused projection's output before its split.
        let variations = (c.qkNorm ? s(q) + s(kv) : 0) + (c.sandwichNorms ? 2 * s(h) : 0)
            + (c.fusedProjections ? s(2 * n * Self.fusedWidth(c)) : 0)
        // Kept attention outputs: slots beyond the one o and lse every block uses.
        let attentionOutput = s(q) + s(4 * n * c.headCount)
        let keptAttention = (memory.attentionOutputSlots(layers: c.layerCount) - 1) * attentionOutput
        // The vocabulary-parallel head: norm1 is the start of the gathered rows; the exchange's other buffers.
        if let headLayout {
            headExchange = s(2 * headLayout.rows) - s(n1) + s(4 * headLayout.targets) + s(4 * headLayout.statistics) + s(4 * headLayout.lse)
                + s(4 * headLayout.hiddenGradient)
        }
        activations = checkpoints + 2 * s(h) + s(2 * n * (c.hiddenSize + backwardFold.residualColumns)) + s(n1) + s(n2) + 2 * s(q) + 2 * s(kv) + s(2 * scratch.count) + 2 * s(4 * n * c.headCount)
            + lora + 5 * s(4 * n) + variations + keptAttention + headExchange
        let oneWeight = s(2 * largest)
        blockWeightBytes = memory.keepBlockWeights
            ? s(2 * Self.blockWeightSlots(c, columns: weightColumns, extraRows: backwardFold.extraRows).count) - oneWeight : 0
        workspace = oneWeight + blockWeightBytes + (32 << 20)
        host = memory.offloadedCheckpoints(layers: c.layerCount) * h
            + memory.offloadedAttentionOutputs(layers: c.layerCount) * (q + 4 * n * c.headCount)
            + (memory.hostEmbedding ? 2 * c.vocabularySize * c.hiddenSize + h : 0) + optimizerHost
    }

    public var description: String {
        let f = DeviceAllocator.format
        let sharded = shardedWorld > 1 || baseShards > 0
            ? " (base sharded over \(shardedWorld) ranks: shards \(f(baseShards)), staging \(f(baseStaging)))" : ""
        let ownTensors = adapterShardedWorld > 1 ? ", this rank's LoRA tensors of \(adapterShardedWorld)" : ""
        let head = request.headWorld == nil ? ""
            : " (head sharded by vocabulary over \(headShardedWorld) ranks: slice \(f(headSlice)), exchange \(f(headExchange)))"
        let state = optimizerKind.map { kind in
            " (\(kind.rawValue)\(ownTensors)" + (optimizerHost > 0 ? ": state \(f(optimizerHost)) in pinned host memory, two slots on the GPU)" : ")")
        } ?? ""
        let ownMasters = ownedAdapterElements.map { " (ZeRO-2: fp32 masters and gradients of \($0) elements, gradient buckets \(f(gradientBuckets)))" } ?? ""
        return "weights \(f(weights))\(sharded)\(head), adapters \(f(adapters))\(ownMasters), optimizer \(f(optimizer))\(state), activations \(f(activations)) "
            + "(checkpoints \(f(checkpoints))), workspace \(f(workspace)); total \(f(total)); host \(f(host)) (\(memory))"
    }
}

// MARK: - What fits a card

extension CUDAMemoryPlan {
    /// What a CUDA context, NVRTC's modules and cuBLASLt take on a card before the trainer allocates anything, for
    /// planning without a GPU (on one, `CUDAContext.contextBytes` is measured). Measured on the H100: see
    /// docs/MEMORY.md.
    public static let typicalContextBytes = 640 << 20
    /// The margin the trainer keeps below the free memory when it checks a plan (CUDADecoderTrainer).
    public static let safetyMarginBytes = 256 << 20

    /// Whether the plan fits a card of `budgetBytes` whose context takes `contextBytes`.
    public func fits(budgetBytes: Int, contextBytes: Int = CUDAMemoryPlan.typicalContextBytes) -> Bool {
        spareBytes(budgetBytes: budgetBytes, contextBytes: contextBytes) >= 0
    }

    /// What is left of a card of `budgetBytes` after the context, the safety margin and the plan (negative: short by).
    public func spareBytes(budgetBytes: Int, contextBytes: Int = CUDAMemoryPlan.typicalContextBytes) -> Int {
        budgetBytes - contextBytes - Self.safetyMarginBytes - total
    }

    /// The longest sequence (a multiple of `step`, at most `limit`) whose plan at `batch` rows fits the budget, or
    /// nil when not even `step` tokens do. The plan grows with the tokens of a step, so a binary search finds it.
    /// `dropout`: LoRA dropout on (its scratch, mask bits and every block's d(x)·Aᵀ); `optimizer`: as in `init`.
    public static func longestSequence(config c: DecoderConfig, batch: Int, rank: Int, memory: CUDATrainerMemoryOptions?,
                                       budgetBytes: Int, contextBytes: Int = CUDAMemoryPlan.typicalContextBytes,
                                       step: Int = 256, limit: Int = 4 << 20, shardedOver world: Int? = nil,
                                       dropout: Bool = false, optimizer: OptimizerKind? = nil, adaptersShardedOver adapterWorld: Int? = nil,
                                       headShardedOver headWorld: Int? = nil) -> Int? {
        func fits(_ units: Int) -> Bool {
            CUDAMemoryPlan(config: c, tokens: batch * units * step, rank: rank, dropout: dropout, memory: memory, shardedOver: world,
                           optimizer: optimizer, adaptersShardedOver: adapterWorld, headShardedOver: headWorld)
                .fitting(budgetBytes: budgetBytes, contextBytes: contextBytes).fits(budgetBytes: budgetBytes, contextBytes: contextBytes)
        }
        guard fits(1) else { return nil }
        var lo = 1, hi = limit / step  // fits(lo); the answer is in lo...hi
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if fits(mid) { lo = mid } else { hi = mid - 1 }
        }
        return lo * step
    }

    /// The largest batch of `sequenceLength`-token rows that fits the budget (at most `limit`), or 0.
    public static func largestBatch(config c: DecoderConfig, sequenceLength t: Int, rank: Int, memory: CUDATrainerMemoryOptions?,
                                    budgetBytes: Int, contextBytes: Int = CUDAMemoryPlan.typicalContextBytes,
                                    limit: Int = 1024, shardedOver world: Int? = nil, dropout: Bool = false,
                                    optimizer: OptimizerKind? = nil, adaptersShardedOver adapterWorld: Int? = nil,
                                    headShardedOver headWorld: Int? = nil) -> Int {
        var lo = 0, hi = limit
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if CUDAMemoryPlan(config: c, tokens: mid * t, rank: rank, dropout: dropout, memory: memory, shardedOver: world,
                              optimizer: optimizer, adaptersShardedOver: adapterWorld, headShardedOver: headWorld)
                .fitting(budgetBytes: budgetBytes, contextBytes: contextBytes).fits(budgetBytes: budgetBytes, contextBytes: contextBytes) {
                lo = mid
            } else {
                hi = mid - 1
            }
        }
        return lo
    }
}

/// Raised when the plan does not fit the GPU, or an allocation fails while following it.
public struct CUDAOutOfMemoryError: Error, CustomStringConvertible {
    public var plan: CUDAMemoryPlan
    public var freeBytes: Int
    public var detail: String

    public var description: String {
        let f = DeviceAllocator.format
        let offload = plan.memory.offloadCheckpoints ? ""
            : "offload the gradient checkpoints to host memory (\(f(plan.checkpoints)) on the GPU now), "
        return "out of GPU memory: the training run needs \(f(plan.total)) but the GPU has \(f(freeBytes)) free (\(detail)). "
            + "Plan: \(plan). Lower --batch or --seq (activations grow with batch × seq), \(offload)or the LoRA rank, "
            + "or pick a smaller model."
    }
}
