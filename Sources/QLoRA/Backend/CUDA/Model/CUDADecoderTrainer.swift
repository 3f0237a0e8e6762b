// QLoRA training of the decoder (every family DecoderConfig describes) on one GPU: the frozen base in NF4 + double
// quant, LoRA on the seven projections (Phi-3: its four fused ones), a forward and hand-written backward that mirror the CPU reference (Training/DecoderBackward.swift,
// whose header derives every gradient), gradient checkpointing, chunked cross-entropy, clipping and AdamW.
//
// Precision: activations and GEMM operands in bf16 with fp32 accumulation (cuBLASLt), norms and softmax sums in
// fp32 inside the kernels, LoRA masters, gradients and optimizer moments in fp32 (bf16 copies feed the GEMMs).
//
// One step, N = rows × length tokens, L blocks (every buffer is allocated once, in `init`, and reused):
//   x₀ = embed(tokens)                          checkpoint 0
//   x_{l+1} = block_l(x_l)                      checkpoint l+1; nothing else of the block is kept
//   loss = CE(head(norm(x_L))) in chunks of rows; dx_L = d loss / d x_L
//   for l = L-1 … 0: recompute block_l(x_l) (all but down_proj's base product, whose output is not needed),
//                    then its backward: dx_l from dx_{l+1}, LoRA gradients added into one fp32 buffer
// Where things live (CUDATrainerMemoryOptions): checkpoints all on the GPU, or offloaded — copied to pinned host
// memory on a second stream as the forward makes them and back ahead of the backward, through 2–3 device slots
// (see "Checkpoint offloading" below); an untied embedding on the GPU or in host memory, its rows then gathered on
// the host and uploaded. Only where the data lives changes: the kernels and their inputs are the same bits.
// One block's working buffers are shared by all blocks: x·Aᵀ of its seven linears (the recomputation writes it
// right before the block's backward reads it), and the MLP's gate/up/activated region, which the attention
// backward's dA, dq, dk, dv reuse once the MLP's backward is done with it (BlockScratchLayout).
// Each linear's NF4 weight is dequantized into a bf16 scratch right before the products that read it: forward,
// recomputation (all but down_proj's) and backward. When the plan has room (`memory.keepBlockWeights`), each linear
// of a block has its own scratch (`weightSlots`), so the backward reads what the block's recomputation dequantized
// right before it (`weightSlotValid`) and dequantizes down_proj's alone, and q, k, v (gate, up) are dequantized in
// one launch; otherwise all share one scratch and every product dequantizes its weight. The same bits either way.
// Evaluation (`forwardLoss`) runs the forward alone: x_{l+1} = block_l(x_l) through two buffers, the loss without
// its gradient, no recomputation and no backward.
//
// Block forward (as LlamaDecoderLayer):            Block backward (g holds d/d output, updated in place):
//   n1 = rms(x)·w1                                    dAct  = down⁻(g)                (into act's buffer)
//   q, k, v = lin(n1); rope(q, k)                     dGate, dUp = swiglu⁻(dAct)       (into gate and up)
//   a = attention(q, k, v)                            dN2 = gate⁻(dGate) + up⁻(dUp)
//   h = x + o(a)                                      g  += rms⁻(h, dN2)               (g is now d/dh)
//   n2 = rms(h)·w2                                    dA = o⁻(g); dq, dk, dv = attention⁻(dA); rope⁻(dq, dk)
//   act = silu(gate(n2))·up(n2)                       dN1 = q⁻(dq) + k⁻(dk) + v⁻(dv)
//   y = h + down(act)                                 g  += rms⁻(x, dN1)               (g is now d/dx)
// where lin⁻(dy) = dy·W + s·(dy·B)·A, adding s·(dy·B)ᵀ·x to dA and s·dyᵀ·(x·Aᵀ) to dB (LoRADeviceWeights' header).
// The families' variations (DecoderModel.swift's header; their derivatives in DecoderBackward.swift's) switch on:
// norms x·(1 + w), q/k norms before RoPE (their inputs kept in qProjected/kProjected), partial rotary and longrope,
// per-layer RoPE and sliding windows, the attention's logit scale and soft-cap, Gemma's sandwich norms (o_proj's and
// down_proj's outputs kept for their norms' backward, so the recomputation runs down_proj's base product too),
// GeGLU, the embedding's √hidden, final-logit soft-capping in the loss, and Phi-3's fused qkv_proj / gate_up_proj,
// whose outputs are split by columns (and whose gradients are joined) through `fusedOutput`.
//
// LoRA dropout (training steps only, as the CPU's Training/DecoderBackward.swift): the LoRA path reads d(x) = x·m/(1−p),
//   lin(x) = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ,   lin⁻(dy) = dy·W + d(s·(dy·B)·A),   dA += s·(dy·B)ᵀ·d(x),   dB unchanged,
// with the mask m of each linear drawn by Training/DropoutMask.swift's counter-based hash from the step's dropout
// seed, the block index and the linear's index (the prelude's dropout_keep8 computes the same hash), so the forward,
// the recomputation and the backward all see the CPU's masks. d(x) is never written: the kernels of
// Ops/CUDALoRADropout.swift hash the mask as the forward reads x for d(x)·Aᵀ and write it as bits (`maskBits`, 1 bit
// per element, every block's kept until its backward: 1/16 of the linear's input) that dA and the add of
// d(s·(dy·B)·A) into dx read (the base GEMMs are the same with and without dropout); dA's token splits go through
// one fp32 scratch. Hashing is what dropout costs, so each element is hashed once a step: d(x)·Aᵀ of every block is
// kept from the forward to the backward too (`droppedXA`, r/hidden of a checkpoint per linear), so the recomputation
// reuses it. When the bits do not fit (`CUDATrainerMemoryOptions.keepDropoutMasks` off), dA hashes the mask again and
// writes it into one linear's `dropoutMaskBits` for dx: twice a step.
// Folded LoRA (`memory.foldLoRA`, LoRAFoldLayout.swift): norm1, norm2 and activated are written with rows of in + R,
// each linear's x·Aᵀ GEMM writes into its columns past `in`, and the base GEMM reads [x | x·Aᵀ …] against the weight
// scratch [W | 0 | s·B] (dequantized with rows of its K, the tail written by lora_fold_tail from the fp32 B):
// y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ in one GEMM, y written once. Under dropout the fused kernels read x with its row stride and
// write d(x)·Aᵀ into the block's own buffer as before, which is copied after x's rows (N·r values). The backward reads
// the same buffers (dA's x with its row stride, dB's x·Aᵀ in place, W with rows of its K) and still adds s·dyB·A
// apart; down_proj's dx is written densely over its strided input once dA and dB have read it (the activation's
// backward reads it densely).
// The backward's fold (`memory.foldLoRABackward`, LoRAFoldLayout.swift's second part): the residual gradient
// `gradient` has rows of hidden + R (`residualStride`; the RMSNorm backwards write and read it with that stride), and
// gate and up rows of I + R' (`gateStride`: their GEMMs, the split of Phi-3's gate_up and both activation kernels use
// it), so o_proj's, down_proj's, gate_proj's and up_proj's backward write s·dy·B into dy's spare columns, copy A's bf16
// rows under W in the weight scratch, and dx = [dy | s·dy·B]·[W ; A] is one GEMM (dA reads the scaled dy·B with α 1).
// Under dropout, and for q, k, v, Phi-3's gate_up (and Gemma's o and down, whose dy is dNorm), the unfolded backward runs.
// Linear biases (Qwen2's q, k, v) are frozen: written into y before the base GEMM accumulates onto it; no gradient.
// Each linear has its own LoRA rank (its A, B and x·Aᵀ are sized by it; dy·B uses a scratch of the largest rank);
// rank 0 is a linear without an adapter (PEFT's target_modules naming only some projections): the base alone.
// Clipping (`clipGradients`) sums as the CPU's GradientClipping does: Σ g² per LoRA tensor in Double, those sums in
// tensor order, so the ZeRO-2 ranks (CUDATrainingEngine's header) and the unsharded run share the norm's bits.
// ZeRO-2 masters per owner (`ownedAdapters`, CUDADecoderTrainer+OwnedAdapters.swift): the fp32 masters and gradients
// hold this rank's span of the flat layout only; the backward writes each block's LoRA gradients into one of two
// buckets, which go to their owners every micro-batch; the bf16 copies stay whole; over several ranks the forward's
// fold (it reads fp32 B of every linear) is off.
// Head sharded by vocabulary (`vocabularyParallel`, CUDADecoderTrainer+VocabularyParallelHead.swift): `head` holds this
// rank's rows of lm_head, and the loss gathers every rank's normed rows, combines the slices' log-sum-exp statistics
// and reduces d(normed) to each row's owner.
// Sharded base (`sharding`, Weights/CUDAShardedBase.swift): each rank keeps 1/W of every block's NF4 storage, and the
// linears' weights are views into two staging buffers that each block is all-gathered into just before its forward,
// its recomputation and backward, and its evaluation forward, the next block's gather overlapping on NCCL's stream.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// One linear layer in the trainer: its NF4 weight and where its LoRA matrices live in the flat parameter buffers.
struct TrainerLinear {
    let name: String
    let weight: CUDANF4Weight
    let rank: Int
    let scale: Float
    /// LoRA dropout probability on the LoRA path's input (training steps with a dropout seed only).
    let dropout: Float
    /// The frozen bias [out] in bf16, or nil.
    let bias: DeviceBuffer<UInt16>?
    /// Element offsets of A [r, in] and B [out, r] in the parameter (and gradient, moment, bf16) buffers.
    let aOffset: Int
    let bOffset: Int
    /// x·Aᵀ from the latest forward, [tokens, r] bf16.
    let xa: DeviceBuffer<UInt16>
    /// Under dropout: this block's own d(x)·Aᵀ [tokens, r], written by the step's forward and read by the
    /// recomputation and the backward (nil when the trainer has no dropout).
    let droppedXA: DeviceBuffer<UInt16>?
    /// Under dropout with `keepDropoutMasks`: this block's mask as bits [tokens, ⌈in/8⌉], written by the step's
    /// forward and read by the backward's dA and dx (a view into `keptDropoutMasks`; nil otherwise).
    let maskBits: DeviceBuffer<UInt8>?
    var inFeatures: Int { weight.columns }
    var outFeatures: Int { weight.rows }
}

/// Where a linear reads its input in a folded block call (LoRAFoldLayout): the input's row stride, and its x·Aᵀ's
/// first column past `in` (nil: the plain product, e.g. no adapter).
struct FoldSite {
    let stride: Int
    let tail: Int?
}

struct TrainerBlock {
    let inputNorm: DeviceBuffer<UInt16>
    /// Before the MLP: Llama's `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`.
    let mlpInputNorm: DeviceBuffer<UInt16>
    /// Gemma's sandwich norms on the attention output and the MLP output (nil elsewhere).
    let attentionOutputNorm: DeviceBuffer<UInt16>?
    let mlpOutputNorm: DeviceBuffer<UInt16>?
    /// Per-head norms of q and k before RoPE, [head_dim] (Qwen3, Gemma 3; nil elsewhere).
    let qNorm: DeviceBuffer<UInt16>?
    let kNorm: DeviceBuffer<UInt16>?
    /// q, k, v, o, gate, up, down; or Phi-3's qkv, o, gate_up, down (`fused`).
    let linears: [TrainerLinear]
    /// What the layer's attention sees (full, or a sliding window).
    let attention: AttentionKind
    /// The layer's RoPE is the sliding layers' own (Gemma 3's local base).
    let slidingRope: Bool
    /// Where the folded LoRA puts each linear's x·Aᵀ (used when `CUDATrainerMemoryOptions.foldLoRA`).
    let fold: LoRAFoldLayout
    var fused: Bool { linears.count == 4 }
    /// Where o_proj, gate_proj (Phi-3: gate_up_proj) and down_proj sit in `linears`.
    var projectionIndices: (o: Int, gate: Int, down: Int) { fused ? (1, 2, 3) : (3, 4, 6) }
}

/// LoRA fine-tuning of a decoder-only model on one GPU. Use from one thread.
public final class CUDADecoderTrainer {
    public let context: CUDAContext
    public let config: DecoderConfig
    /// Tokens (rows × length) one step may hold at most.
    public let capacityTokens: Int
    public let plan: CUDAMemoryPlan
    /// Length of the flat LoRA buffers: A and B of every linear, each padded to 128 elements (the padding stays 0).
    public let parameterCount: Int
    /// Completed optimizer steps.
    public private(set) var optimizerSteps = 0

    /// Where the checkpoints and the embedding live (the plan's; a tied embedding always stays on the GPU).
    public let memory: CUDATrainerMemoryOptions

    let blocks: [TrainerBlock]
    /// The base sharded over the ranks (nil: every weight whole on this GPU).
    let shardedBase: CUDAShardedBase?
    /// Blocks all-gathered so far with a sharded base (0 without one).
    public var baseGathers: Int { shardedBase?.gatherCount ?? 0 }
    /// Every linear layer's NF4 base weight by its name (generation during training shares them).
    public var frozenWeights: [String: CUDANF4Weight] {
        Dictionary(blocks.flatMap { $0.linears.map { ($0.name, $0.weight) } }, uniquingKeysWith: { first, _ in first })
    }
    /// The input embedding [V, H] bf16 on the GPU, or nil when it lives in `hostEmbedding`.
    let embedding: DeviceBuffer<UInt16>?
    /// lm_head [V, H] bf16, or with the head sharded by vocabulary this rank's rows of it (`vocabularyParallel.columns`).
    let head: DeviceBuffer<UInt16>
    /// The head sharded by vocabulary over NCCL ranks (CUDADecoderTrainer+VocabularyParallelHead.swift; nil: whole).
    let vocabularyParallel: CUDAVocabularyParallelHead?
    /// The untied embedding in host memory: a step's rows are gathered into `embeddingStaging` (pinned, [N, H])
    /// and uploaded on the main stream; `stagingFree` marks the end of the latest upload, before which the host
    /// must not write the staging buffer again.
    /// Multiplied by √hidden (Gemma): the device table at lookup, the host table (`hostEmbedding`) once, here.
    let hostEmbedding: [UInt16]?
    /// The embedding's multiplier in the compute type (Gemma's √hidden), or nil.
    let embeddingScale: Float?
    let embeddingStaging: PinnedHostBuffer?
    let stagingFree: CUDAEvent?
    let finalNorm: DeviceBuffer<UInt16>
    let absmaxCode: DeviceBuffer<Float>
    /// RoPE inverse frequencies, rotaryDim/2 each: the full-attention layers' (longrope: its short factors), longrope's
    /// long factors, and the sliding layers' own base (Gemma 3).
    let inverseFrequencies: DeviceBuffer<Float>
    let longInverseFrequencies: DeviceBuffer<Float>?
    let slidingInverseFrequencies: DeviceBuffer<Float>?

    // LoRA state, flat: fp32 masters, bf16 copies for the GEMMs, fp32 gradients, and the AdamW moments of
    // `optimizerStep` (nil when the trainer was made for an external optimizer, which holds its own state).
    let params: DeviceBuffer<Float>
    let params16: DeviceBuffer<UInt16>
    let grads: DeviceBuffer<Float>
    /// ZeRO-2 masters and gradients per owner (CUDADecoderTrainer+OwnedAdapters.swift): `params` and `grads` then hold
    /// this rank's span of the flat layout only, and the backward writes each block's gradients into a bucket. nil:
    /// both hold every tensor.
    public let ownedAdapters: CUDAOwnedAdapters?
    let moment1: DeviceBuffer<Float>?
    let moment2: DeviceBuffer<Float>?

    // Activations (capacity N tokens).
    /// Device buffers of the gradient checkpoints, [N, H] each: x_l lives in `checkpointSlots[l % count]`. All
    /// L + 1 without offloading; with it, `memory.checkpointSlots` of them and x₀ … x_{offloadedCount−1} also in
    /// `hostCheckpoints` (see "Checkpoint offloading" below).
    let checkpointSlots: [DeviceBuffer<UInt16>]
    let offloadedCount: Int
    let hostCheckpoints: PinnedHostBuffer?
    /// The stream the checkpoint copies run on, and per slot: x written (main stream), its copy to the host done,
    /// the slot's value dead (main stream), its copy back done.
    let copyStream: CUDAStream?
    let produced: [CUDAEvent], offloadDone: [CUDAEvent], slotFree: [CUDAEvent], fetched: [CUDAEvent]
    let norm1: DeviceBuffer<UInt16>, hidden: DeviceBuffer<UInt16>, norm2: DeviceBuffer<UInt16>
    let gradient: DeviceBuffer<UInt16>, dNorm: DeviceBuffer<UInt16>
    /// The row stride of the residual stream's gradient: hidden, plus the backward fold's spare columns
    /// (`backwardFold.residualColumns`).
    public let residualStride: Int
    /// Which linears fold their backward, and their weight scratch's extra rows (LoRABackwardFold).
    let backwardFold: LoRABackwardFold
    /// The row stride of gate and up: intermediate, plus the backward fold's spare columns (`backwardFold.mlpColumns`).
    public let gateStride: Int
    let q: DeviceBuffer<UInt16>
    /// The attention output o of the block in hand and its log-sum-exp: `attentionOutputSlots[l % S]` for block l
    /// (see "Kept attention outputs" below).
    private(set) var attended: DeviceBuffer<UInt16>, lse: DeviceBuffer<Float>
    let attentionOutputSlots: [(o: DeviceBuffer<UInt16>, lse: DeviceBuffer<Float>)]
    /// Blocks 0 ..< offloadedAttentionCount send their o and lse to `hostAttention` (o of every such block, then
    /// their lse), with per slot: o written, its copy to the host done, the slot free again, its copy back done.
    let offloadedAttentionCount: Int
    let hostAttention: PinnedHostBuffer?
    let attentionProduced: [CUDAEvent], attentionOffloadDone: [CUDAEvent], attentionSlotFree: [CUDAEvent], attentionFetched: [CUDAEvent]
    let k: DeviceBuffer<UInt16>, v: DeviceBuffer<UInt16>
    /// q_proj and k_proj outputs before the q/k norms (the norms' backward reads them); nil without q/k norms.
    let qProjected: DeviceBuffer<UInt16>?, kProjected: DeviceBuffer<UInt16>?
    /// o_proj's and down_proj's outputs before the sandwich norms, [N, H] each; nil without sandwich norms.
    let attentionProjected: DeviceBuffer<UInt16>?, mlpProjected: DeviceBuffer<UInt16>?
    /// A fused projection's output [N, q + 2kv] or [N, 2I] before it is split by columns (and its gradient, joined,
    /// in the backward); nil without Phi-3's fused projections.
    let fusedOutput: DeviceBuffer<UInt16>?
    /// One region (BlockScratchLayout) holding gate, up and activated [N, I], and, once the MLP's backward is done
    /// with them, the attention backward's dAttended, dq [N, q], dk, dv [N, kv] and its fp32 dQ accumulator [N, q],
    /// and between the forward and the backward the loss's logits (views into it).
    let blockScratch: DeviceBuffer<UInt16>
    let gate: DeviceBuffer<UInt16>, up: DeviceBuffer<UInt16>, activated: DeviceBuffer<UInt16>
    let dAttended: DeviceBuffer<UInt16>, dq: DeviceBuffer<UInt16>, dk: DeviceBuffer<UInt16>, dv: DeviceBuffer<UInt16>
    let dqAccumulator: DeviceBuffer<Float>
    /// Attention through the 64-row kernels, whose dQ is summed without atomics: with it, a training run has the same
    /// bits on every run (the default flash kernels add dQ with fp32 atomics, so dq may differ in its last bits between
    /// runs; everything else, the gradient norm included, is summed in a fixed order), about 2× slower attention.
    public var deterministic = false
    /// The loss scale of the fp16 path (GradScaler's S; torch's initial 2^16 unless the engine sets another): the
    /// backward computes d(S · loss sum / normalizer), so small fp16 gradients do not flush to zero, and the LoRA
    /// gradients come out S times too large until `unscaleGradients()`. 1 in bf16, whose range needs no scaling.
    public var lossScale: Float
    /// The factor the gradient buffer holds: `lossScale` of the micro-batches since the gradients were zeroed, 1 after
    /// `unscaleGradients()`.
    public private(set) var gradientScale: Float = 1
    let delta: DeviceBuffer<Float>
    let dyB: DeviceBuffer<UInt16>
    /// The fused dropout's dA partial sums (loraDropoutScratchCount of the largest linear; nil when no linear has dropout).
    let dropoutPartials: DeviceBuffer<Float>?
    /// The mask of the linear in the backward as bits, from dA's kernel to dx's (loraDropoutMaskBytes of the widest
    /// input; nil without dropout, or when every block's masks are kept from the forward).
    let dropoutMaskBits: DeviceBuffer<UInt8>?
    /// Every block's masks as bits from the forward to the backward (CUDAMemoryPlan.keptMaskLayout; nil without
    /// dropout or `keepDropoutMasks`).
    let keptDropoutMasks: DeviceBuffer<UInt8>?
    /// The current step's dropout seed (nil: no dropout, e.g. evaluation).
    private var stepDropoutSeed: UInt64?
    /// Where each linear j of the block at work has its weight dequantized: views into one scratch, a block's own
    /// region per linear when `memory.keepBlockWeights`, else all the start of one weight's scratch.
    let weightSlots: [DeviceBuffer<UInt16>]
    /// Whether weightSlots[j] holds linear j's weight of the block at work (kept weights only; reset by each block's
    /// forward or recomputation).
    private var weightSlotValid: [Bool]
    /// The row stride of the weight in weightSlots[j] (in, or the folded K of its product: LoRAFoldLayout).
    private var weightSlotStride: [Int]
    /// One loss chunk's logits [lossChunkRows, V] (a view into `blockScratch`, dead outside the loss).
    let logits: DeviceBuffer<UInt16>
    let lossChunkRows: Int
    let rowLoss: DeviceBuffer<Float>
    let lossOut: DeviceBuffer<Float>
    /// The clipping norm's buffers (`clipGradients`): every LoRA tensor's element offset and count in the flat buffers
    /// (`parameterSlots()` order), its sum of squares, and [norm, coefficient].
    let tensorOffsets: DeviceBuffer<Int64>, tensorCounts: DeviceBuffer<Int64>
    let tensorSquares: DeviceBuffer<Double>
    let normResult: DeviceBuffer<Double>
    let tokenIDs: DeviceBuffer<Int32>, targets: DeviceBuffer<Int32>, positions: DeviceBuffer<Int32>, segments: DeviceBuffer<Int32>

    // MARK: - Construction

    /// How the frozen weights and adapters are filled once the buffers exist.
    enum Source {
        case model(DecoderModel)
        case random(seed: UInt64, dropout: Float)
    }

    /// A trainer for `model` (its dense fp32 linear weights are quantized to NF4 + double quant here, as
    /// bitsandbytes would; its LoRA adapters, on any of the seven projections, each with its own rank, scale and
    /// dropout, become the trained parameters; its linear biases stay frozen). `memory`: where the checkpoints and the
    /// embedding live (nil: `CUDATrainerMemoryOptions.automatic(for:)`).
    /// `sharding`: shard the NF4 base over this communicator's ranks (every rank builds its trainer alike).
    /// `optimizer`: the kind a `CUDAOptimizer` over `parameterSlots()` will step with (its state is its own: the
    /// trainer then allocates no moments and the plan counts that kind's state); nil: `optimizerStep`'s fp32 AdamW.
    /// `adaptersShardedOver`: that optimizer steps this rank's tensors of adapters sharded over so many ranks (ZeRO-2,
    /// CUDATrainingEngine), this trainer being rank `adapterRank` of them: it holds fp32 masters and gradients of its
    /// own tensors only (`ownedAdapters`); the plan counts the largest rank's.
    /// `shardHead`: shard the head by vocabulary over this communicator's ranks (CUDADecoderTrainer+VocabularyParallelHead.swift).
    public convenience init(context: CUDAContext, model: DecoderModel, capacityTokens: Int, memory: CUDATrainerMemoryOptions? = nil,
                            sharding: NCCLCollective? = nil, optimizer: OptimizerKind? = nil, adaptersShardedOver: Int? = nil,
                            adapterRank: Int = 0, shardHead: NCCLCollective? = nil) throws {
        var ranks: [[Int]] = []
        var dropout: Float = 0
        for block in model.blocks {
            ranks.append(try block.linears.map { layer in
                if let bias = layer.bias, bias.count != layer.outFeatures {
                    throw UsageError("the bias of \(layer.name) has \(bias.count) values for \(layer.outFeatures) outputs")
                }
                guard let lora = layer.lora else { return 0 }  // no adapter: the frozen base alone
                guard lora.dropout >= 0 && lora.dropout < 1 else {
                    throw UsageError("LoRA dropout \(lora.dropout) on \(layer.name) is outside [0, 1)")
                }
                dropout = max(dropout, lora.dropout)
                return lora.rank
            })
        }
        // A shared table is tied whatever the config says (the plan then keeps it on the GPU, once).
        var config = model.config
        if model.head === model.embedding { config.tieWordEmbeddings = true }
        try self.init(context: context, config: config, ranks: ranks, alpha: nil, dropout: dropout > 0,
                      capacityTokens: capacityTokens, memory: memory, source: .model(model), sharding: sharding, optimizer: optimizer,
                      adaptersShardedOver: adaptersShardedOver, adapterRank: adapterRank, shardHead: shardHead)
    }

    /// A trainer with random NF4 weights made on the GPU (for benchmarks: no checkpoint needed), LoRA rank `rank`
    /// with alpha = `alpha` and dropout `dropout` on every projection (seven, or Phi-3's four fused ones), A
    /// Kaiming-uniform and B zero as PEFT initialises them. No biases (even when `config.attentionBias`); every norm
    /// multiplies by 1. The embedding is the same wherever it lives.
    public convenience init(context: CUDAContext, randomConfig config: DecoderConfig, rank: Int, alpha: Double, capacityTokens: Int,
                            dropout: Float = 0, seed: UInt64 = 0, memory: CUDATrainerMemoryOptions? = nil,
                            sharding: NCCLCollective? = nil, optimizer: OptimizerKind? = nil, adaptersShardedOver: Int? = nil,
                            adapterRank: Int = 0, shardHead: NCCLCollective? = nil) throws {
        guard dropout >= 0 && dropout < 1 else { throw UsageError("LoRA dropout \(dropout) is outside [0, 1)") }
        try self.init(context: context, config: config,
                      ranks: Array(repeating: Array(repeating: rank, count: CUDAMemoryPlan.linearShapes(config).count), count: config.layerCount),
                      alpha: alpha, dropout: dropout > 0, capacityTokens: capacityTokens, memory: memory,
                      source: .random(seed: seed, dropout: dropout), sharding: sharding, optimizer: optimizer,
                      adaptersShardedOver: adaptersShardedOver, adapterRank: adapterRank, shardHead: shardHead)
    }

    /// `ranks[l][j]`: the LoRA rank of block l's linear j (q, k, v, o, gate, up, down, or Phi-3's qkv, o, gate_up,
    /// down; 0: no adapter); `dropout`: whether any linear drops out (then the d(x) scratch is allocated).
    init(context ctx: CUDAContext, config c: DecoderConfig, ranks: [[Int]], alpha: Double?, dropout: Bool, capacityTokens n: Int,
         memory: CUDATrainerMemoryOptions?, source: Source, sharding: NCCLCollective? = nil, optimizer: OptimizerKind? = nil,
         adaptersShardedOver: Int? = nil, adapterRank: Int = 0, shardHead: NCCLCollective? = nil) throws {
        try c.checkTrainable()
        guard CUDAContext.attentionHeadDims.contains(c.headDim) else {
            throw UsageError("head dimension \(c.headDim) is not supported by the GPU attention kernels "
                             + "(\(CUDAContext.attentionHeadDims.map(String.init).joined(separator: ", ")))")
        }
        guard c.rotaryDim % 2 == 0, c.rotaryDim <= c.headDim else {
            throw UsageError("rotary dimension \(c.rotaryDim) of head dimension \(c.headDim) is not even")
        }
        guard c.layerAttention.count == c.layerCount else {
            throw UsageError("the config describes the attention of \(c.layerAttention.count) layers for \(c.layerCount) layers")
        }
        let linearCount = CUDAMemoryPlan.linearShapes(c).count
        guard ranks.count == c.layerCount, ranks.allSatisfy({ $0.count == linearCount }) else {
            throw UsageError("the GPU trainer needs a LoRA rank for each of the \(linearCount) projections of all \(c.layerCount) blocks")
        }
        let maxRank = ranks.joined().max() ?? 0
        guard n > 0, ranks.joined().allSatisfy({ $0 >= 0 }), maxRank > 0 else {
            throw UsageError("the GPU trainer needs at least one token and at least one LoRA adapter")
        }
        if let memory, memory.offloadCheckpoints, memory.checkpointSlots < 2 {
            throw UsageError("offloaded checkpoints need at least 2 GPU slots (\(memory.checkpointSlots) asked for)")
        }
        context = ctx
        lossScale = ctx.computeDType == .fp16 ? 65536 : 1
        // √hidden in the compute type, as transformers multiplies (Gemma); nil: no scale.
        let embeddingScale: Float? = c.scalesEmbedding
            ? ctx.computeDType.decode(ctx.computeDType.encode(Float(Double(c.hiddenSize).squareRoot()))) : nil
        self.embeddingScale = embeddingScale
        config = c
        capacityTokens = n
        let free = (try? ctx.availableBytes()) ?? Int.max
        // Kept block weights, then kept dropout masks, then kept attention outputs, only where they fit (the plan's
        // one rule; the attention outputs also only where three quarters of the machine's RAM holds the pinned host
        // memory): else one weight's scratch, each product dequantizing its weight, masks hashed again by the
        // backward, the attention forward recomputed.
        let plan = CUDAMemoryPlan(config: c, tokens: n, ranks: ranks, dropout: dropout, memory: memory, shardedOver: sharding?.worldSize,
                                  optimizer: optimizer, adaptersShardedOver: adaptersShardedOver, headShardedOver: shardHead?.worldSize)
            .fitting(budgetBytes: free, contextBytes: 0, hostBytes: HostMemory.physicalBytes.map(HostMemory.pinnableBytes))
        self.plan = plan
        self.memory = plan.memory
        if plan.total > free - (256 << 20) {
            let budget = ctx.memoryBudget.map { ", a budget of \(DeviceAllocator.format($0)) (--gpu-memory)" } ?? ""
            throw CUDAOutOfMemoryError(plan: plan, freeBytes: free, detail: "checked before allocating\(budget)")
        }
        var initialMasters: MasterValues? = nil
        do {
            let a = ctx.allocator
            func bf16(_ count: Int) throws -> DeviceBuffer<UInt16> { try a.buffer(UInt16.self, count: count) }
            // LoRA layout: for each block, for each of the seven linears, A then B (LoRAFlatLayout).
            let shapes = CUDAMemoryPlan.linearShapes(c)
            let flat = LoRAFlatLayout(shapes: shapes, ranks: ranks)
            let layout = (0..<c.layerCount).map { l in shapes.indices.map { (aOffset: flat.a[l][$0], bOffset: flat.b[l][$0]) } }
            let offset = flat.count
            parameterCount = offset
            // ZeRO-2 per owner: the fp32 masters and gradients of this rank's span only (plus two gradient buckets).
            let owned = try adaptersShardedOver.map { world -> CUDAOwnedAdapters in
                guard optimizer != nil else {
                    throw UsageError("adapters sharded over ranks are stepped by a CUDAOptimizer over parameterSlots(); the trainer's own AdamW steps every tensor")
                }
                return try CUDAOwnedAdapters(allocator: a, device: ctx.device, layout: flat, worldSize: world, rank: adapterRank)
            }
            ownedAdapters = owned
            if let owned, plan.memory.foldLoRA, owned.window != 0..<offset {
                throw UsageError("the folded LoRA reads every linear's fp32 B, which a rank of sharded masters does not hold (the plan turns it off)")
            }
            params = try a.buffer(Float.self, count: owned.map { max($0.window.count, 1) } ?? offset)
            params16 = try bf16(offset)
            grads = try a.buffer(Float.self, count: owned.map { max($0.window.count, 1) } ?? offset)
            try grads.fill(byte: 0)
            if optimizer == nil {
                let m = try a.buffer(Float.self, count: offset), v = try a.buffer(Float.self, count: offset)
                for buffer in [m, v] { try buffer.fill(byte: 0) }
                (moment1, moment2) = (m, v)
            } else {
                (moment1, moment2) = (nil, nil)
            }

            absmaxCode = try a.buffer(copying: DoubleQuantizedAbsmax.signedDynamicMap)
            func frequencies(_ rope: RopeParameters, long: Bool = false) throws -> DeviceBuffer<Float> {
                try a.buffer(copying: c.ropeInverseFrequencies(rope, long: long).map { Float($0) })
            }
            let fullRope = RopeParameters(theta: c.ropeTheta, scaling: c.ropeScaling)
            inverseFrequencies = try frequencies(fullRope)
            longInverseFrequencies = c.ropeScaling.kind == .longrope ? try frequencies(fullRope, long: true) : nil
            slidingInverseFrequencies = try c.slidingRope.map { try frequencies($0) }
            let names = c.fusedProjections
                ? ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
                : ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
            // Random norms multiply by 1: w = 1, or w = 0 in Gemma's x·(1 + w).
            let unitNorm = ctx.computeDType.encode(1 - c.normWeightOffset)
            var blocks: [TrainerBlock] = []
            var rng = SeededGenerator(seed: 0)
            if let sharding {
                switch source {
                case .model(let model):
                    shardedBase = try CUDAShardedBase(blocks: model.blocks.map { try $0.linears.map(CUDAInference.quantize) },
                                                      collective: sharding, code: absmaxCode)
                case .random(let seed, _):
                    shardedBase = try CUDAShardedBase(randomShapes: Array(repeating: shapes, count: c.layerCount), collective: sharding,
                                                      code: absmaxCode, seed: seed)
                }
            } else {
                shardedBase = nil
            }
            // x·Aᵀ is only read by the backward of the block whose recomputation just wrote it, so all blocks share
            // one buffer per linear, sized by that linear's largest rank (under dropout, each block keeps its own
            // d(x)·Aᵀ from the forward instead: `droppedXA`).
            let sharedXA = try CUDAMemoryPlan.largestRanks(ranks).map { try bf16(max(n * $0, 1)) }
            let keepMasks = dropout && plan.memory.keepDropoutMasks
            let maskLayout = CUDAMemoryPlan.keptMaskLayout(tokens: n, shapes: shapes, ranks: ranks)
            let keptMasks = keepMasks ? try a.buffer(UInt8.self, count: maskLayout.bytes) : nil
            keptDropoutMasks = keptMasks
            for l in 0..<c.layerCount {
                var linears: [TrainerLinear] = []
                for (j, shape) in shapes.enumerated() {
                    var name = c.modulePrefix + "layers.\(l).\(names[j])"
                    let rank = ranks[l][j]
                    let weight: CUDANF4Weight
                    let scale: Float
                    var linearDropout: Float = 0
                    var bias: DeviceBuffer<UInt16>? = nil
                    switch source {
                    case .model(let model):
                        let layer = model.blocks[l].linears[j]
                        name = layer.name
                        // The layer's own NF4 weight when it is one (as loaded), else quantized as bitsandbytes would.
                        if let shardedBase {
                            weight = shardedBase.weights[l][j]
                        } else {
                            weight = try CUDANF4Weight(try CUDAInference.quantize(layer), allocator: a, signedDynamicMap: absmaxCode)
                        }
                        scale = layer.lora?.scale ?? 1
                        linearDropout = layer.lora?.dropout ?? 0
                        if let values = layer.bias { bias = try a.buffer(copying: values.map(ctx.computeDType.encode)) }
                    case .random(let seed, let dropout):
                        linearDropout = dropout
                        if let shardedBase {
                            weight = shardedBase.weights[l][j]
                        } else {
                            weight = try CUDANF4Weight(randomRows: shape.out, columns: shape.in, context: ctx, code: absmaxCode,
                                                       packedSeed: seed &+ rng.next(), absmaxSeed: seed &+ rng.next())
                        }
                        scale = rank == 0 ? 0 : Float((alpha ?? Double(2 * rank)) / Double(rank))
                    }
                    // Every adapter gets one when the trainer has dropout, as CUDAMemoryPlan counts them.
                    let droppedXA = dropout && rank > 0 ? try bf16(n * rank) : nil
                    let maskBits = maskLayout.offsets[l][j].flatMap { offset in
                        keptMasks?.view(at: offset, count: CUDAContext.loraDropoutMaskBytes(tokens: n, inFeatures: shape.in))
                    }
                    linears.append(TrainerLinear(name: name, weight: weight, rank: rank, scale: scale, dropout: linearDropout, bias: bias,
                                                 aOffset: layout[l][j].aOffset, bOffset: layout[l][j].bOffset, xa: sharedXA[j],
                                                 droppedXA: droppedXA, maskBits: maskBits))
                }
                // The norms as stored (Gemma's w of x·(1 + w): the kernels add the offset in fp32).
                func norm(_ values: [Float]?, _ count: Int, _ what: String) throws -> DeviceBuffer<UInt16> {
                    switch source {
                    case .model:
                        guard let values, values.count == count else {
                            throw UsageError("block \(l)'s \(what) norm has \(values?.count ?? 0) weights for \(count) values")
                        }
                        return try a.buffer(copying: values.map(ctx.computeDType.encode))
                    case .random:
                        return try a.buffer(copying: [UInt16](repeating: unitNorm, count: count))
                    }
                }
                let cpu: DecoderBlock? = { if case .model(let model) = source { return model.blocks[l] } else { return nil } }()
                let h = c.hiddenSize
                blocks.append(TrainerBlock(
                    inputNorm: try norm(cpu?.inputNorm, h, "input"), mlpInputNorm: try norm(cpu?.mlpInputNorm, h, "MLP input"),
                    attentionOutputNorm: c.sandwichNorms ? try norm(cpu?.attentionOutputNorm, h, "attention output") : nil,
                    mlpOutputNorm: c.sandwichNorms ? try norm(cpu?.mlpOutputNorm, h, "MLP output") : nil,
                    qNorm: c.qkNorm ? try norm(cpu?.qNorm, c.headDim, "q") : nil,
                    kNorm: c.qkNorm ? try norm(cpu?.kNorm, c.headDim, "k") : nil,
                    linears: linears, attention: c.layerAttention[l],
                    slidingRope: c.slidingRope != nil && c.rope(layer: l) == c.slidingRope,
                    fold: LoRAFoldLayout(config: c, ranks: ranks[l])))
            }
            self.blocks = blocks
            let tensors = Self.loraTensors(blocks)
            // Within `grads`, which starts at this rank's span under sharded masters (only its own tensors are summed).
            let windowStart = owned?.window.lowerBound ?? 0
            tensorOffsets = try a.buffer(copying: tensors.map { Int64($0.offset - windowStart) })
            tensorCounts = try a.buffer(copying: tensors.map { Int64($0.count) })
            tensorSquares = try a.buffer(Double.self, count: tensors.count)
            normResult = try a.buffer(Double.self, count: 2)

            // Activations first: the random embedding is made in the logits buffer when it goes to the host.
            let h = c.hiddenSize
            let slotCount = plan.memory.deviceCheckpoints(layers: c.layerCount)
            checkpointSlots = try (0..<slotCount).map { _ in try bf16(n * h) }
            offloadedCount = plan.memory.offloadedCheckpoints(layers: c.layerCount)
            func pinned(_ bytes: Int, _ what: String) throws -> PinnedHostBuffer {
                do {
                    return try PinnedHostBuffer(device: ctx.device, bytes: bytes)
                } catch let error as CUDAError {
                    // Not a GPU out-of-memory error: say which host memory could not be pinned.
                    throw CUDAError(call: error.call, "could not pin \(DeviceAllocator.format(bytes)) of host memory for \(what): \(error.message)")
                }
            }
            func events(_ count: Int) throws -> [CUDAEvent] { try (0..<count).map { _ in try CUDAEvent(device: ctx.device, timing: false) } }
            offloadedAttentionCount = plan.memory.offloadedAttentionOutputs(layers: c.layerCount)
            copyStream = offloadedCount > 0 || offloadedAttentionCount > 0 ? try CUDAStream(device: ctx.device) : nil
            if offloadedCount > 0 {
                hostCheckpoints = try pinned(offloadedCount * n * h * 2, "\(offloadedCount) offloaded gradient checkpoints")
                produced = try events(slotCount); offloadDone = try events(slotCount); slotFree = try events(slotCount); fetched = try events(slotCount)
            } else {
                hostCheckpoints = nil
                produced = []; offloadDone = []; slotFree = []; fetched = []
            }
            let attentionSlotCount = plan.memory.attentionOutputSlots(layers: c.layerCount)
            let attentionSlots = try (0..<attentionSlotCount).map { _ in
                (o: try bf16(n * c.qDim), lse: try a.buffer(Float.self, count: n * c.headCount))
            }
            attentionOutputSlots = attentionSlots
            (attended, lse) = attentionSlots[0]
            if offloadedAttentionCount > 0 {
                hostAttention = try pinned(offloadedAttentionCount * n * (2 * c.qDim + 4 * c.headCount),
                                           "\(offloadedAttentionCount) blocks' kept attention outputs")
                attentionProduced = try events(2); attentionOffloadDone = try events(2)
                attentionSlotFree = try events(2); attentionFetched = try events(2)
            } else {
                hostAttention = nil
                attentionProduced = []; attentionOffloadDone = []; attentionSlotFree = []; attentionFetched = []
            }
            // Folded LoRA: norm1, norm2 and activated hold rows of in + R (each block's x·Aᵀ after x).
            let fold = plan.memory.foldLoRA ? LoRAFoldLayout.widestColumns(c, ranks: ranks) : [0, 0, 0]
            let weightColumns = plan.memory.foldLoRA ? LoRAFoldLayout.widestK(c, ranks: ranks) : shapes.map(\.in)
            // With the head sharded by vocabulary, norm1 is the start of the gathered normed rows (dead outside the loss).
            let headLayout = shardHead.map { VocabularyParallelHeadLayout(config: c, tokens: n, worldSize: $0.worldSize, normColumns: h + fold[0]) }
            let gatheredRows = try headLayout.map { try bf16($0.rows) }
            norm1 = try gatheredRows?.view(at: 0, count: n * (h + fold[0])) ?? bf16(n * (h + fold[0]))
            hidden = try bf16(n * h); norm2 = try bf16(n * (h + fold[1]))
            let backwardFold = LoRABackwardFold(config: c, ranks: ranks, enabled: plan.memory.foldLoRABackward)
            self.backwardFold = backwardFold
            residualStride = h + backwardFold.residualColumns
            gateStride = c.intermediateSize + backwardFold.mlpColumns
            gradient = try bf16(n * residualStride); dNorm = try bf16(n * h)
            q = try bf16(n * c.qDim)
            k = try bf16(n * c.kvDim); v = try bf16(n * c.kvDim)
            qProjected = c.qkNorm ? try bf16(n * c.qDim) : nil
            kProjected = c.qkNorm ? try bf16(n * c.kvDim) : nil
            attentionProjected = c.sandwichNorms ? try bf16(n * h) : nil
            mlpProjected = c.sandwichNorms ? try bf16(n * h) : nil
            fusedOutput = c.fusedProjections ? try bf16(n * CUDAMemoryPlan.fusedWidth(c)) : nil
            let scratch = BlockScratchLayout(config: c, tokens: n, foldedColumns: fold[2], gateColumns: backwardFold.mlpColumns)
            blockScratch = try bf16(scratch.count)
            gate = blockScratch.view(at: scratch.gate, count: n * gateStride)
            up = blockScratch.view(at: scratch.up, count: n * gateStride)
            activated = blockScratch.view(at: scratch.activated, count: n * (c.intermediateSize + fold[2]))
            dAttended = blockScratch.view(at: scratch.dAttended, count: n * c.qDim)
            dq = blockScratch.view(at: scratch.dq, count: n * c.qDim)
            dk = blockScratch.view(at: scratch.dk, count: n * c.kvDim)
            dv = blockScratch.view(at: scratch.dv, count: n * c.kvDim)
            dqAccumulator = blockScratch.view(as: Float.self, at: scratch.dqAccumulator, count: n * c.qDim)
            delta = try a.buffer(Float.self, count: n * c.headCount)
            dyB = try bf16(n * maxRank)
            dropoutPartials = dropout
                ? try a.buffer(Float.self, count: CUDAMemoryPlan.dropoutScratchCount(tokens: n, shapes: shapes, ranks: ranks)) : nil
            dropoutMaskBits = dropout && !keepMasks
                ? try a.buffer(UInt8.self, count: CUDAMemoryPlan.dropoutMaskBytes(tokens: n, shapes: shapes)) : nil
            let slots = CUDAMemoryPlan.blockWeightSlots(c, columns: weightColumns, extraRows: backwardFold.extraRows)
            let keep = plan.memory.keepBlockWeights
            let slotCounts = shapes.indices.map { (shapes[$0].out + backwardFold.extraRows[$0]) * weightColumns[$0] }
            let weightScratch = try bf16(keep ? slots.count : slotCounts.max() ?? 1)
            weightSlots = shapes.indices.map { weightScratch.view(at: keep ? slots.offsets[$0] : 0, count: slotCounts[$0]) }
            weightSlotValid = Array(repeating: false, count: shapes.count)
            weightSlotStride = shapes.map(\.in)
            lossChunkRows = scratch.lossChunkRows
            logits = blockScratch.view(at: 0, count: lossChunkRows * c.vocabularySize)
            rowLoss = try a.buffer(Float.self, count: n)
            lossOut = try a.buffer(Float.self, count: 2)
            tokenIDs = try a.buffer(Int32.self, count: n)
            targets = try a.buffer(Int32.self, count: n)
            positions = try a.buffer(Int32.self, count: n)
            segments = try a.buffer(Int32.self, count: n)
            vocabularyParallel = try shardHead.map { collective in
                try CUDAVocabularyParallelHead(collective: collective, vocab: c.vocabularySize, rows: gatheredRows!, layout: headLayout!, allocator: a)
            }
            // This rank's rows of the head (all of them unless it is sharded by vocabulary).
            let headColumns = vocabularyParallel?.columns ?? 0..<c.vocabularySize

            // The tables. An untied embedding goes to the host when the plan says so.
            let tableCount = c.vocabularySize * h
            let onHost = plan.memory.hostEmbedding
            if onHost {
                embeddingStaging = try pinned(n * h * 2, "the embedding's staging buffer")
                stagingFree = try CUDAEvent(device: ctx.device, timing: false)
            } else {
                embeddingStaging = nil
                stagingFree = nil
            }
            switch source {
            case .model(let model):
                let values = model.embedding.values.map(ctx.computeDType.encode)
                let deviceTable = onHost ? nil : try a.buffer(copying: values)
                hostEmbedding = onHost ? Self.scaledRows(values, by: embeddingScale, ctx.computeDType) : nil
                embedding = deviceTable
                if model.head === model.embedding, let deviceTable {
                    head = deviceTable.view(at: headColumns.lowerBound * h, count: headColumns.count * h)
                } else if headColumns.isEmpty {
                    head = try bf16(1)  // a rank without vocabulary rows (V < W)
                } else {
                    head = try a.buffer(copying: model.head.values[(headColumns.lowerBound * h)..<(headColumns.upperBound * h)]
                                                    .map(ctx.computeDType.encode))
                }
                finalNorm = try a.buffer(copying: model.finalNorm.map(ctx.computeDType.encode))
                var host = [Float](repeating: 0, count: offset)
                for (l, block) in blocks.enumerated() {
                    for (j, linear) in block.linears.enumerated() {
                        guard let lora = model.blocks[l].linears[j].lora else { continue }
                        for i in 0..<lora.a.count { host[linear.aOffset + i] = lora.a.storage[i] }
                        for i in 0..<lora.b.count { host[linear.bOffset + i] = lora.b.storage[i] }
                    }
                }
                if owned != nil { initialMasters = .values(host) } else { try params.upload(host) }
            case .random(let seed, _):
                // Made a chunk of rows at a time (each chunk its own seed), directly in the GPU table, or in the
                // logits buffer and copied to the host: the same values either way.
                let scratch = logits.pointer
                let chunkRows = max(1, min(c.vocabularySize, logits.count / h))
                var table = onHost ? [UInt16](repeating: 0, count: tableCount) : nil
                let deviceTable = onHost ? nil : try bf16(tableCount)
                for (index, start) in stride(from: 0, to: c.vocabularySize, by: chunkRows).enumerated() {
                    let rows = min(chunkRows, c.vocabularySize - start)
                    let chunkSeed = seed &+ 101 &+ UInt64(index) &* 0x9E37_79B9_7F4A_7C15
                    if let deviceTable {
                        try ctx.fillRandomBF16(deviceTable.address(at: start * h), count: rows * h, seed: chunkSeed, std: 0.02)
                    } else {
                        try ctx.fillRandomBF16(scratch, count: rows * h, seed: chunkSeed, std: 0.02)
                        try table!.withUnsafeMutableBytes { bytes in
                            guard let base = bytes.baseAddress else { return }
                            try ctx.device.copy(toHost: base + 2 * start * h, from: scratch, bytes: 2 * rows * h)
                            try ctx.device.stream.synchronize()
                        }
                    }
                }
                hostEmbedding = table.map { Self.scaledRows($0, by: embeddingScale, ctx.computeDType) }
                embedding = deviceTable
                if c.tieWordEmbeddings, let deviceTable {
                    head = deviceTable.view(at: headColumns.lowerBound * h, count: headColumns.count * h)
                } else {
                    // A slice of several ranks' head is drawn from its own seed (random weights: benchmarks, memory checks).
                    head = try bf16(max(headColumns.count * h, 1))
                    if !headColumns.isEmpty {
                        try ctx.fillRandomBF16(head.pointer, count: headColumns.count * h, seed: seed &+ 202 &+ UInt64(headColumns.lowerBound), std: 0.02)
                    }
                }
                finalNorm = try a.buffer(copying: [UInt16](repeating: unitNorm, count: c.hiddenSize))
                // PEFT: A ~ Kaiming-uniform (a = √5), i.e. U(-1/√in, 1/√in); B = 0.
                if owned != nil {
                    initialMasters = .random(seed: seed)
                } else {
                    try params.fill(byte: 0)
                    for block in blocks {
                        for linear in block.linears where linear.rank > 0 {
                            try Self.fillKaimingUniform(linear, at: params.address(at: linear.aOffset), seed: seed, context: ctx)
                        }
                    }
                }
            }
            if owned == nil { try ctx.convertToBF16(params, into: params16, count: offset) }
            _ = try ctx.blas()
            // Sharded masters: written a block at a time through a gradient bucket (no whole fp32 buffer on the GPU).
            if let initialMasters { try writeMasters(initialMasters) }
        } catch let error as CUDAError where error.isOutOfMemory {
            throw CUDAOutOfMemoryError(plan: plan, freeBytes: (try? ctx.device.memoryInfo().free) ?? -1, detail: error.message)
        }
    }

    /// A table's values times `scale`, each rounded to the compute type as the embedding kernel rounds them (so the
    /// host table gives the device table's bits).
    static func scaledRows(_ values: [UInt16], by scale: Float?, _ dtype: ComputeDType) -> [UInt16] {
        guard let scale else { return values }
        return values.map { dtype.encode(dtype.decode($0) * scale) }
    }

    deinit {
        // The pinned host buffers go with the trainer: the copies that read or write them must be over first.
        try? copyStream?.synchronize()
        try? shardedBase?.synchronize()
        try? stagingFree?.synchronize()
    }

    // MARK: - Linear layers with LoRA

    /// Linear j's weight into its slot, unless the slot still holds it (kept weights: from the block's recomputation),
    /// with rows `rowStride` apart (folded LoRA: its product's K; nil: dense). `weightSlotStride[j]` says which.
    private func dequantize(_ l: TrainerLinear, _ j: Int, rowStride: Int? = nil) throws {
        if memory.keepBlockWeights {
            try dequantizeKept([(l, j, rowStride)])
        } else {
            try context.dequantize([(l.weight, weightSlots[j], rowStride)])
            weightSlotStride[j] = rowStride ?? l.inFeatures
        }
    }

    /// With kept weights, the linears' weights their slots do not hold yet, in as few launches as the tiles kernel
    /// takes (q, k, v in one); without, nothing (each product dequantizes its own weight into the one scratch).
    private func dequantizeKept(_ linears: [(TrainerLinear, Int, Int?)]) throws {
        guard memory.keepBlockWeights else { return }
        let needed = linears.filter { !weightSlotValid[$0.1] }
        guard !needed.isEmpty else { return }
        try context.dequantize(needed.map { ($0.0.weight, weightSlots[$0.1], $0.2) })
        for (l, j, stride) in needed {
            weightSlotValid[j] = true
            weightSlotStride[j] = stride ?? l.inFeatures
        }
    }

    /// Where linear j of `b` reads its input in a folded block call (nil: the call is not folded): the input's row
    /// stride and, for a folded product, its x·Aᵀ's first column past `in`.
    private func foldSite(_ b: TrainerBlock, _ j: Int, folding: Bool) -> FoldSite? {
        folding ? FoldSite(stride: b.fold.inputStride[j], tail: b.linears[j].rank > 0 ? b.fold.tailStart[j] : nil) : nil
    }

    /// The folded K of `l`'s product at `site` (its weight's row stride): in + its tail's end.
    private func foldedK(_ l: TrainerLinear, _ site: FoldSite?) -> Int? {
        guard let site, let tail = site.tail else { return nil }
        return l.inFeatures + tail + l.rank
    }

    /// The dropout mask seed of `l` in this step, or nil when its LoRA path reads x itself (no dropout on `l`, or
    /// no dropout seed: evaluation). `seeds` are the block's per-linear seeds.
    private func maskSeed(_ l: TrainerLinear, _ j: Int, _ seeds: [UInt64]?) -> UInt64? {
        guard l.dropout > 0, let seeds, dropoutPartials != nil, l.droppedXA != nil else { return nil }
        return seeds[j]
    }

    /// The dropout mask of `l`'s LoRA input for `seed`, or nil (the LoRA path reads x itself).
    private func dropoutMask(_ l: TrainerLinear, seed: UInt64?) -> LoRADropoutMask? {
        seed.map { LoRADropoutMask(seed: $0, keep: 1 - l.dropout) }
    }

    /// The buffer that holds `l`'s d(x)·Aᵀ from its forward to its backward: the block's own under dropout.
    private func xaBuffer(_ l: TrainerLinear, seed: UInt64?) -> DeviceBuffer<UInt16> {
        seed != nil ? l.droppedXA ?? l.xa : l.xa
    }

    /// Which part of a linear's forward to run: x·Aᵀ alone, the base product alone (folded: x·Aᵀ is in place), or both.
    enum ForwardPart { case xa, base, all }

    /// y (+)= x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ for `n` tokens, keeping d(x)·Aᵀ in `xaBuffer` (d: dropout with mask `seed`, or
    /// none). `part`: x·Aᵀ alone, or the rest alone. `recompute`: the recomputation before the block's backward,
    /// which finds a dropped-out d(x)·Aᵀ where this step's forward left it (same x, same mask: the same bits).
    /// Folded (`site`, LoRAFoldLayout): x has rows `site.stride` apart; x·Aᵀ goes into its columns from in + tail, and
    /// the base product is y (+)= [x | …]·[W | 0 | s·B]ᵀ over K = in + tail + r: one GEMM writes y (the group's
    /// x·Aᵀ must all be written before its first base product reads them).
    /// `yStride`: y's rows that far apart (gate and up under the backward's fold; no bias then).
    private func linearForward(_ l: TrainerLinear, _ j: Int, x: CUdeviceptr, y: CUdeviceptr, n: Int, accumulate: Bool, part: ForwardPart = .all,
                               recompute: Bool = false, seed: UInt64?, site: FoldSite? = nil, yStride: Int? = nil) throws {
        let blas = try context.blas()
        if let yStride, yStride != l.outFeatures, l.bias != nil {
            throw CUDAError(call: "linearForward", "\(l.name): a bias onto rows \(yStride) apart")
        }
        let a16 = params16.address(at: l.aOffset), b16 = params16.address(at: l.bOffset)
        let xa = xaBuffer(l, seed: seed)
        let ldx = site?.stride ?? l.inFeatures
        if l.rank > 0 && part != .base {
            if let mask = dropoutMask(l, seed: seed) {
                if !recompute {
                    try context.loraDropoutXA(x: x, a: a16, into: xa.pointer, tokens: n, inFeatures: l.inFeatures, rank: l.rank, mask: mask,
                                              maskBits: l.maskBits, xStride: ldx)
                }
                // Folded: the block's own d(x)·Aᵀ (kept for the recomputation) copied after x's rows.
                if let tail = site?.tail {
                    try context.copyColumns(from: xa.pointer, sourceStride: l.rank, to: x + CUdeviceptr(2 * (l.inFeatures + tail)),
                                            destinationStride: ldx, rows: n, columns: l.rank)
                }
            } else if let tail = site?.tail {
                try blas.gemm(m: n, n: l.rank, k: l.inFeatures, a: x, b: a16, transB: true, c: x + CUdeviceptr(2 * (l.inFeatures + tail)),
                              lda: ldx, ldc: ldx)
            } else {
                try blas.gemm(m: n, n: l.rank, k: l.inFeatures, a: x, b: a16, transB: true, c: xa.pointer, lda: ldx)
            }
        }
        guard part != .xa else { return }
        if let bias = l.bias {
            try context.addRowVector(bias.pointer, to: y, rows: n, columns: l.outFeatures, overwrite: !accumulate)
        }
        if let k = foldedK(l, site), let tail = site?.tail {
            try dequantize(l, j, rowStride: k)
            let w = weightSlots[j].pointer
            try context.loraFoldTail(b: masterAddress(l.bOffset), scale: l.scale, into: w, out: l.outFeatures, in: l.inFeatures,
                                     ld: k, width: tail + l.rank, first: tail, rank: l.rank)
            try blas.gemm(m: n, n: l.outFeatures, k: k, a: x, b: w, transB: true, c: y, beta: accumulate || l.bias != nil ? 1 : 0,
                          lda: ldx, ldb: k, ldc: yStride)
            return
        }
        try dequantize(l, j)
        try blas.gemm(m: n, n: l.outFeatures, k: l.inFeatures, a: x, b: weightSlots[j].pointer, transB: true, c: y,
                      beta: accumulate || l.bias != nil ? 1 : 0, lda: ldx, ldb: weightSlotStride[j], ldc: yStride)
        guard l.rank > 0 else { return }
        try blas.gemm(m: n, n: l.outFeatures, k: l.rank, a: xa.pointer, b: b16, transB: true, c: y, alpha: l.scale, beta: 1, ldc: yStride)
    }

    /// dx (+)= dy·W + d(s·(dy·B)·A); dA += s·(dy·B)ᵀ·d(x); dB += s·dyᵀ·(d(x)·Aᵀ). dx may be x itself (x is read
    /// first). With a mask `seed`, d(x) is regenerated from x (the forward's mask: same seed, same indices).
    /// `dyStride`: dy's rows that far apart (the residual gradient's); with room for r columns past `out` and the
    /// backward's fold on for linear j (and no mask), dx = [dy | s·dy·B]·[W ; A] in one GEMM (LoRAFoldLayout.swift).
    private func linearBackward(_ l: TrainerLinear, _ j: Int, x: CUdeviceptr, dy: CUdeviceptr, dx: CUdeviceptr, n: Int, accumulate: Bool,
                                seed: UInt64?, site: FoldSite? = nil, dyStride: Int? = nil) throws {
        let blas = try context.blas()
        let a16 = params16.address(at: l.aOffset), b16 = params16.address(at: l.bOffset)
        // Folded: x has rows site.stride apart and x·Aᵀ sits in them; the weight has rows of its folded K, as the
        // forward dequantized it (kept) or again (the same row stride either way: the same GEMMs, the same bits).
        let ldx = site?.stride ?? l.inFeatures
        let ldy = dyStride ?? l.outFeatures
        try dequantize(l, j, rowStride: foldedK(l, site))
        let weight = weightSlots[j].pointer, ldw = weightSlotStride[j]
        guard l.rank > 0 else {  // no adapter: dx (+)= dy·W alone
            try blas.gemm(m: n, n: l.inFeatures, k: l.outFeatures, a: dy, b: weight, c: dx, beta: accumulate ? 1 : 0, lda: ldy, ldb: ldw)
            return
        }
        // dB [out, r] += s·dyᵀ·xa
        let xa = site?.tail.map { x + CUdeviceptr(2 * (l.inFeatures + $0)) } ?? xaBuffer(l, seed: seed).pointer
        try blas.gemm(m: l.outFeatures, n: l.rank, k: n, a: dy, transA: true, b: xa, c: gradientAddress(l.bOffset),
                      outputType: .float32, alpha: l.scale, beta: 1, lda: ldy, ldb: site?.tail != nil ? ldx : nil)
        if seed == nil, backwardFold.folds[j], ldy >= l.outFeatures + l.rank, l.rank <= backwardFold.extraRows[j] {
            // The backward's fold. dyB' = s·dy·B into dy's columns out … out + r − 1.
            let dyB = dy + CUdeviceptr(2 * l.outFeatures)
            try blas.gemm(m: n, n: l.rank, k: l.outFeatures, a: dy, b: b16, c: dyB, alpha: l.scale, lda: ldy, ldc: ldy)
            // dA [r, in] += dyB'ᵀ·x (s is in dyB')
            try blas.gemm(m: l.rank, n: l.inFeatures, k: n, a: dyB, transA: true, b: x, c: gradientAddress(l.aOffset),
                          outputType: .float32, beta: 1, lda: ldy, ldb: ldx)
            // A's bf16 rows under W (rows out … out + r − 1 of the scratch, W's row stride), then dx (+)= [dy | dyB']·[W ; A].
            try context.copyColumns(from: a16, sourceStride: l.inFeatures, to: weight + CUdeviceptr(2 * l.outFeatures * ldw),
                                    destinationStride: ldw, rows: l.rank, columns: l.inFeatures)
            try blas.gemm(m: n, n: l.inFeatures, k: l.outFeatures + l.rank, a: dy, b: weight, c: dx, beta: accumulate ? 1 : 0,
                          lda: ldy, ldb: ldw)
            return
        }
        // dyB [n, r] = dy·B
        try blas.gemm(m: n, n: l.rank, k: l.outFeatures, a: dy, b: b16, c: dyB.pointer, lda: ldy)
        // dA [r, in] += s·dyBᵀ·d(x), the mask read from the forward's bits, or hashed into dropoutMaskBits for dx (dx may
        // be x: it is written after this)
        let mask = dropoutMask(l, seed: seed)
        let maskBits = l.maskBits ?? dropoutMaskBits
        if let mask, let dropoutPartials {
            try context.loraDropoutGradA(x: x, dyB: dyB.pointer, into: gradientAddress(l.aOffset), scratch: dropoutPartials, tokens: n,
                                         inFeatures: l.inFeatures, rank: l.rank, scale: l.scale, mask: mask,
                                         maskBits: l.maskBits == nil ? dropoutMaskBits : nil, storedMaskBits: l.maskBits, xStride: ldx)
        } else {
            try blas.gemm(m: l.rank, n: l.inFeatures, k: n, a: dyB.pointer, transA: true, b: x, c: gradientAddress(l.aOffset),
                          outputType: .float32, alpha: l.scale, beta: 1, ldb: ldx)
        }
        // dx (+)= dy·W + d(s·dyB·A) (dense: the down_proj's dx over its strided input is read densely after)
        try blas.gemm(m: n, n: l.inFeatures, k: l.outFeatures, a: dy, b: weight, c: dx, beta: accumulate ? 1 : 0, lda: ldy, ldb: ldw)
        if let mask {
            try context.loraDropoutAddDX(dyB: dyB.pointer, a: a16, into: dx, tokens: n, inFeatures: l.inFeatures, rank: l.rank,
                                         scale: l.scale, mask: mask, maskBits: maskBits)
        } else {
            try blas.gemm(m: n, n: l.inFeatures, k: l.rank, a: dyB.pointer, b: a16, c: dx, alpha: l.scale, beta: 1)
        }
    }

    // MARK: - Blocks

    /// The attention of block `b` over the batch: the family's logit scale and soft-cap, the layer's window.
    private func attentionShape(_ b: TrainerBlock, _ batch: TrainingBatch) -> AttentionShape {
        var shape = AttentionShape(batch: batch.rows, seq: batch.length, heads: config.headCount, kvHeads: config.kvHeadCount,
                                   headDim: config.headDim)
        shape.scale = config.attentionScale
        shape.softcap = config.attentionSoftcap
        if case .sliding(let window) = b.attention { shape.window = window }
        return shape
    }

    /// The per-linear dropout seeds of block `index` in the current step (DropoutMask.linearSeed), or nil.
    private func blockDropoutSeeds(_ index: Int) -> [UInt64]? {
        guard let stepDropoutSeed, dropoutPartials != nil else { return nil }
        return (0..<blocks[index].linears.count).map { DropoutMask.linearSeed(stepSeed: stepDropoutSeed, block: index, linear: $0) }
    }

    /// The current batch's choice of longrope factors (transformers: long once any position passes the original
    /// context), set by `upload`.
    private var longRope = false

    /// Rotates q and k of block `b` in place (`backward`: by the opposite angles): the layer's frequencies, the
    /// leading rotaryDim dimensions of each head, longrope's attention factor on cos and sin.
    private func rope(_ b: TrainerBlock, q: DeviceBuffer<UInt16>, k: DeviceBuffer<UInt16>, tokens n: Int, backward: Bool) throws {
        let c = config
        let frequencies = b.slidingRope ? (slidingInverseFrequencies ?? inverseFrequencies)
            : longRope ? (longInverseFrequencies ?? inverseFrequencies) : inverseFrequencies
        let factor = Float(c.ropeScaling.kind == .longrope && !b.slidingRope ? c.ropeScaling.attentionFactor : 1)
        for (x, heads) in [(q, c.headCount), (k, c.kvHeadCount)] {
            try context.rope(x, positions: positions, inverseFrequencies: frequencies, tokens: n, heads: heads, headDim: c.headDim,
                             rotaryDim: c.rotaryDim, attentionFactor: factor, backward: backward)
        }
    }

    /// y = RMSNorm(x)·(w + offset) with the family's offset (Gemma: 1), over rows of `dim` (hidden, or head_dim for
    /// q/k norms); with `residual`, y = residual + that (Gemma's sandwich norms).
    func norm(_ x: DeviceBuffer<UInt16>, _ w: DeviceBuffer<UInt16>, into y: DeviceBuffer<UInt16>, rows: Int, dim: Int,
                      residual: DeviceBuffer<UInt16>? = nil, outputStride: Int? = nil) throws {
        try context.rmsNormForward(x: x, weight: w, into: y, rows: rows, dim: dim, eps: config.rmsNormEps,
                                   weightOffset: config.normWeightOffset, residual: residual, outputStride: outputStride)
    }

    /// dx (= or += with `accumulate`) the norm's input gradient given dy (dx may be dy: each row is read first).
    /// `dyStride`, `dxStride`: the rows of dy, dx that far apart (the residual gradient's `residualStride`).
    private func normBackward(_ x: DeviceBuffer<UInt16>, _ w: DeviceBuffer<UInt16>, dy: DeviceBuffer<UInt16>, into dx: DeviceBuffer<UInt16>,
                              rows: Int, dim: Int, accumulate: Bool, dyStride: Int? = nil, dxStride: Int? = nil) throws {
        try context.rmsNormBackward(x: x, weight: w, dy: dy, into: dx, rows: rows, dim: dim, eps: config.rmsNormEps,
                                    weightOffset: config.normWeightOffset, accumulate: accumulate, dyStride: dyStride, dxStride: dxStride)
    }

    /// Splits a fused projection's output [n, Σ widths] (in `fusedOutput`) by columns into `parts`, or, with
    /// `join`, writes the parts side by side into it. `partStride`: the parts' rows that far apart (default: their width).
    private func splitColumns(_ parts: [(DeviceBuffer<UInt16>, Int)], tokens n: Int, join: Bool = false, partStride: Int? = nil) throws {
        guard let fused = fusedOutput else { throw CUDAError(call: "CUDADecoderTrainer", "no fused projection buffer") }
        let width = parts.reduce(0) { $0 + $1.1 }
        var column = 0
        for (part, w) in parts {
            if join {
                try context.copyColumns(from: part.pointer, sourceStride: partStride ?? w, to: fused.address(at: column),
                                        destinationStride: width, rows: n, columns: w)
            } else {
                try context.copyColumns(from: fused.address(at: column), sourceStride: width, to: part.pointer,
                                        destinationStride: partStride ?? w, rows: n, columns: w)
            }
            column += w
        }
    }

    /// The block's forward from `x`; writes the output into `output`, or, when nil (recomputation before the
    /// backward), stops after what the backward needs. `seeds`: the block's dropout seeds (nil: no dropout).
    /// With the variations (DecoderModel.swift's header): q/k norms between the projections and RoPE, the sandwich
    /// norms on o_proj's and down_proj's outputs before their residual adds, fused projections split by columns.
    private func blockForward(_ b: TrainerBlock, x: DeviceBuffer<UInt16>, output: DeviceBuffer<UInt16>?, batch: TrainingBatch,
                              seeds: [UInt64]?) throws {
        let c = config, ctx = context, n = batch.tokenCount, h = c.hiddenSize
        let L = b.linears
        let folding = memory.foldLoRA
        func forward(_ j: Int, x: CUdeviceptr, y: CUdeviceptr, accumulate: Bool, part: ForwardPart = .all, yStride: Int? = nil) throws {
            try linearForward(L[j], j, x: x, y: y, n: n, accumulate: accumulate, part: part, recompute: output == nil,
                              seed: maskSeed(L[j], j, seeds), site: foldSite(b, j, folding: folding), yStride: yStride)
        }
        /// Linears that read one input: folded, every x·Aᵀ first (each base product reads those before its own).
        /// `yStride`: their outputs' rows that far apart.
        func group(_ js: [Int], x: CUdeviceptr, ys: [CUdeviceptr], yStride: Int? = nil) throws {
            if folding {
                for j in js { try forward(j, x: x, y: 0, accumulate: false, part: .xa) }
                for (j, y) in zip(js, ys) { try forward(j, x: x, y: y, accumulate: false, part: .base, yStride: yStride) }
            } else {
                for (j, y) in zip(js, ys) { try forward(j, x: x, y: y, accumulate: false, yStride: yStride) }
            }
        }
        /// Dequantizes kept weights in one launch, each with its folded row stride.
        func keep(_ js: [Int]) throws {
            try dequantizeKept(js.map { (L[$0], $0, foldedK(L[$0], foldSite(b, $0, folding: folding))) })
        }
        let (o, gateUp, down) = b.projectionIndices
        // The inputs' row strides (folded: in + R, the group's x·Aᵀ after x).
        let stride1 = folding ? b.fold.inputStride[0] : h, stride2 = folding ? b.fold.inputStride[gateUp] : h
        let strideDown = folding ? b.fold.inputStride[down] : c.intermediateSize
        try norm(x, b.inputNorm, into: norm1, rows: n, dim: h, outputStride: stride1)
        // q and k go through their norms from the projection buffers when there are q/k norms.
        let qOut = qProjected ?? q, kOut = kProjected ?? k
        weightSlotValid = weightSlotValid.map { _ in false }  // this block's weights from here on
        if b.fused {
            try group([0], x: norm1.pointer, ys: [fusedOutput!.pointer])
            try splitColumns([(qOut, c.qDim), (kOut, c.kvDim), (v, c.kvDim)], tokens: n)
        } else {
            try keep([0, 1, 2])  // one launch (kept weights only)
            try group([0, 1, 2], x: norm1.pointer, ys: [qOut.pointer, kOut.pointer, v.pointer])
        }
        if let qNorm = b.qNorm, let kNorm = b.kNorm {
            try norm(qOut, qNorm, into: q, rows: n * c.headCount, dim: c.headDim)
            try norm(kOut, kNorm, into: k, rows: n * c.kvHeadCount, dim: c.headDim)
        }
        try rope(b, q: q, k: k, tokens: n, backward: false)
        // The recomputation finds o and lse kept from the forward (`keepAttentionOutputs`).
        if output != nil || !memory.keepAttentionOutputs {
            try ctx.attentionForward(q: q, k: k, v: v, into: attended, lse: lse, segments: segments, shape: attentionShape(b, batch),
                                     flash: !deterministic)
        }
        if let projected = attentionProjected, let outputNorm = b.attentionOutputNorm {
            try forward(o, x: attended.pointer, y: projected.pointer, accumulate: false)
            try norm(projected, outputNorm, into: hidden, rows: n, dim: h, residual: x)
        } else {
            try ctx.device.copy(deviceTo: hidden.pointer, from: x.pointer, bytes: 2 * n * h)
            try forward(o, x: attended.pointer, y: hidden.pointer, accumulate: true)
        }
        try norm(hidden, b.mlpInputNorm, into: norm2, rows: n, dim: h, outputStride: stride2)
        if b.fused {
            try group([gateUp], x: norm2.pointer, ys: [fusedOutput!.pointer])
            try splitColumns([(gate, c.intermediateSize), (up, c.intermediateSize)], tokens: n, partStride: gateStride)
        } else {
            try keep([4, 5])
            try group([4, 5], x: norm2.pointer, ys: [gate.pointer, up.pointer], yStride: gateStride)
        }
        try ctx.gatedActivationForward(c.mlpActivation, gate: gate, up: up, into: activated, count: n * c.intermediateSize,
                                       outputRows: (c.intermediateSize, strideDown), inputStride: gateStride)
        if let projected = mlpProjected, let outputNorm = b.mlpOutputNorm {
            // The backward reads down_proj's output (its norm's input), so the recomputation computes it too.
            try forward(down, x: activated.pointer, y: projected.pointer, accumulate: false)
            if let output { try norm(projected, outputNorm, into: output, rows: n, dim: h, residual: hidden) }
        } else if let output {
            try ctx.device.copy(deviceTo: output.pointer, from: hidden.pointer, bytes: 2 * n * h)
            try forward(down, x: activated.pointer, y: output.pointer, accumulate: true)
        } else {
            try forward(down, x: activated.pointer, y: 0, accumulate: true, part: .xa)
        }
    }

    /// Given d/d(block output) in `gradient`, adds the block's LoRA gradients and leaves d/d(block input) there.
    /// Sandwich norms: d/d(down_proj output) = n_moᵀ(g) and d/d(o_proj output) = n_aoᵀ(d/dh), each through `dNorm`
    /// (free at those points); q/k norms: d/d(projection) = norm backward of rope⁻¹(dq), in place; fused projections:
    /// the parts' gradients joined side by side are the fused output's gradient.
    private func blockBackward(_ b: TrainerBlock, x: DeviceBuffer<UInt16>, batch: TrainingBatch, seeds: [UInt64]?) throws {
        let c = config, ctx = context, n = batch.tokenCount, h = c.hiddenSize
        let L = b.linears
        let folding = memory.foldLoRA  // as the recomputation left norm1, norm2 and activated
        func backward(_ j: Int, x: CUdeviceptr, dy: CUdeviceptr, dx: CUdeviceptr, accumulate: Bool, dyStride: Int? = nil) throws {
            try linearBackward(L[j], j, x: x, dy: dy, dx: dx, n: n, accumulate: accumulate, seed: maskSeed(L[j], j, seeds),
                               site: foldSite(b, j, folding: folding), dyStride: dyStride)
        }
        let (o, gateUp, down) = b.projectionIndices
        let rs = residualStride  // `gradient`'s rows
        if let projected = mlpProjected, let outputNorm = b.mlpOutputNorm {
            try normBackward(projected, outputNorm, dy: gradient, into: dNorm, rows: n, dim: h, accumulate: false, dyStride: rs)
            try backward(down, x: activated.pointer, dy: dNorm.pointer, dx: activated.pointer, accumulate: false)
        } else {
            try backward(down, x: activated.pointer, dy: gradient.pointer, dx: activated.pointer, accumulate: false, dyStride: rs)
        }
        try ctx.gatedActivationBackward(c.mlpActivation, dh: activated, gate: gate, up: up, dgate: gate, dup: up, count: n * c.intermediateSize,
                                        rows: (c.intermediateSize, gateStride))
        if b.fused {
            try splitColumns([(gate, c.intermediateSize), (up, c.intermediateSize)], tokens: n, join: true, partStride: gateStride)
            try backward(gateUp, x: norm2.pointer, dy: fusedOutput!.pointer, dx: dNorm.pointer, accumulate: false)
        } else {
            try backward(4, x: norm2.pointer, dy: gate.pointer, dx: dNorm.pointer, accumulate: false, dyStride: gateStride)
            try backward(5, x: norm2.pointer, dy: up.pointer, dx: dNorm.pointer, accumulate: true, dyStride: gateStride)
        }
        try normBackward(hidden, b.mlpInputNorm, dy: dNorm, into: gradient, rows: n, dim: h, accumulate: true, dxStride: rs)
        if let projected = attentionProjected, let outputNorm = b.attentionOutputNorm {
            try normBackward(projected, outputNorm, dy: gradient, into: dNorm, rows: n, dim: h, accumulate: false, dyStride: rs)
            try backward(o, x: attended.pointer, dy: dNorm.pointer, dx: dAttended.pointer, accumulate: false)
        } else {
            try backward(o, x: attended.pointer, dy: gradient.pointer, dx: dAttended.pointer, accumulate: false, dyStride: rs)
        }
        try ctx.attentionBackward(q: q, k: k, v: v, o: attended, dout: dAttended, lse: lse, segments: segments, dq: dq, dk: dk, dv: dv,
                                  delta: delta, dqAccumulator: dqAccumulator, shape: attentionShape(b, batch), flash: !deterministic)
        try rope(b, q: dq, k: dk, tokens: n, backward: true)
        if let qNorm = b.qNorm, let kNorm = b.kNorm, let qProjected, let kProjected {
            try normBackward(qProjected, qNorm, dy: dq, into: dq, rows: n * c.headCount, dim: c.headDim, accumulate: false)
            try normBackward(kProjected, kNorm, dy: dk, into: dk, rows: n * c.kvHeadCount, dim: c.headDim, accumulate: false)
        }
        if b.fused {
            try splitColumns([(dq, c.qDim), (dk, c.kvDim), (dv, c.kvDim)], tokens: n, join: true)
            try backward(0, x: norm1.pointer, dy: fusedOutput!.pointer, dx: dNorm.pointer, accumulate: false)
        } else {
            try backward(0, x: norm1.pointer, dy: dq.pointer, dx: dNorm.pointer, accumulate: false)
            try backward(1, x: norm1.pointer, dy: dk.pointer, dx: dNorm.pointer, accumulate: true)
            try backward(2, x: norm1.pointer, dy: dv.pointer, dx: dNorm.pointer, accumulate: true)
        }
        try normBackward(x, b.inputNorm, dy: dNorm, into: gradient, rows: n, dim: h, accumulate: true, dxStride: rs)
    }

    // MARK: - Step

    /// Uploads the batch: token ids, shifted targets (-100 = not counted), positions and segment ids.
    private func upload(_ batch: TrainingBatch) throws {
        let c = config
        guard batch.tokenCount <= capacityTokens else {
            throw UsageError("a batch of \(batch.rows) × \(batch.length) tokens exceeds the trainer's \(capacityTokens)")
        }
        // The embedding and cross-entropy kernels index by these: refuse what is out of range here, on the host.
        try batch.checkIDs(vocabularySize: c.vocabularySize)
        var shifted = [Int32](repeating: TrainingBatch.ignoreIndex, count: batch.tokenCount)
        for r in 0..<batch.rows {
            for t in 0..<max(batch.length - 1, 0) { shifted[r * batch.length + t] = batch.labels[r * batch.length + t + 1] }
        }
        longRope = c.usesLongRopeFactors(sequenceLength: Int(batch.positions.max() ?? 0) + 1)
        try tokenIDs.upload(batch.tokens)
        try targets.upload(shifted)
        try positions.upload(batch.positions)
        try segments.upload(batch.exampleStarts)
    }

    /// Forward and backward over one micro-batch: adds d(loss sum / normalizer)/d(LoRA) into the gradients (zeroed
    /// first unless `accumulate`), as `DecoderModel.accumulateGradients` does with `TrainingStepOptions.dropoutSeed`
    /// = `dropoutSeed` (the same masks; nil: no dropout, as in evaluation). Queues the work without waiting;
    /// `lastLoss()` reads the loss sum and count.
    public func forwardBackward(batch: TrainingBatch, normalizer: Int, accumulate: Bool = false, dropoutSeed: UInt64? = nil) throws {
        let c = config, n = batch.tokenCount, h = c.hiddenSize
        try upload(batch)
        // The ranks' token counts, while NCCL's stream is idle (the vocabulary-parallel head's first exchange).
        let headBatch = try vocabularyParallel?.exchangeCounts(n)
        stepDropoutSeed = dropoutSeed
        if !accumulate {
            try grads.fill(byte: 0)
            gradientScale = lossScale
        } else if gradientScale != lossScale {
            throw CUDAError(call: "forwardBackward", "accumulating with loss scale \(lossScale) into gradients of scale \(gradientScale)")
        }
        try embed(batch, into: slot(0))
        try offload(0, tokens: n)
        for (l, block) in blocks.enumerated() {
            try awaitOffload(beforeWriting: l + 1)
            try useAttentionSlot(of: l, forward: true)
            try shardedBase?.acquire(l, next: l + 1 < blocks.count ? l + 1 : nil)
            try blockForward(block, x: slot(l), output: slot(l + 1), batch: batch, seeds: blockDropoutSeeds(l))
            try shardedBase?.release(l)
            try offload(l + 1, tokens: n)
            try offloadAttention(l, tokens: n)
        }

        // Final norm, head and cross-entropy a chunk of rows at a time; dNorm receives d/d(normed).
        let last = slot(blocks.count)
        // The loss scale (fp16: GradScaler's S; else 1) enters here, at the start of the backward.
        let scale = lossScale / Float(max(normalizer, 1))
        try headLoss(last, tokens: n, headBatch: headBatch, gradientScale: scale)
        try normBackward(last, finalNorm, dy: dNorm, into: gradient, rows: n, dim: h, accumulate: false, dxStride: residualStride)

        // x_L is dead: its slot takes the first checkpoint back from the host.
        try prefetch(blocks.count - checkpointSlots.count, tokens: n)
        for l in stride(from: blocks.count - 1, through: 0, by: -1) {
            let seeds = blockDropoutSeeds(l)
            try awaitFetch(l)
            try useAttentionSlot(of: l, forward: false)
            try shardedBase?.acquire(l, next: l > 0 ? l - 1 : nil)
            try blockForward(blocks[l], x: slot(l), output: nil, batch: batch, seeds: seeds)
            try openGradientBucket(l)
            try blockBackward(blocks[l], x: slot(l), batch: batch, seeds: seeds)
            try shardedBase?.release(l)
            // Sharded masters: the block's bucket goes to its owners every micro-batch (the trainer's own hook).
            if ownedAdapters != nil { try closeGradientBucket(l) } else { try afterBlockBackward?(l) }
            try prefetch(l - checkpointSlots.count, tokens: n)
            try prefetchAttention(l - 2, tokens: n)
        }
        try finishGradientBuckets()
    }

    // MARK: - Embedding and checkpoint offloading

    /// x₀ = the batch's embedding rows, into `out`: the embedding kernel over the GPU table, or, with the table on
    /// the host, the rows gathered there into the pinned staging buffer and uploaded on the main stream.
    private func embed(_ batch: TrainingBatch, into out: DeviceBuffer<UInt16>) throws {
        let c = config, ctx = context, n = batch.tokenCount, h = c.hiddenSize
        if let embedding {
            try ctx.embeddingForward(ids: tokenIDs, table: embedding, into: out, tokens: n, vocab: c.vocabularySize, dim: h,
                                     scale: embeddingScale)
            return
        }
        guard let hostEmbedding, let staging = embeddingStaging, let stagingFree else {
            throw CUDAError(call: "CUDADecoderTrainer", "the embedding is neither on the GPU nor on the host")
        }
        // The previous upload from the staging buffer must have finished before the host overwrites it (usually
        // long done: it ran at the start of the previous step). Ids were checked against the vocabulary in upload.
        try stagingFree.synchronize()
        let rowBytes = 2 * h
        hostEmbedding.withUnsafeBytes { table in
            guard let base = table.baseAddress else { return }
            for (t, id) in batch.tokens.enumerated() {
                (staging.pointer + t * rowBytes).copyMemory(from: base + Int(id) * rowBytes, byteCount: rowBytes)
            }
        }
        try ctx.device.copy(toDevice: out.pointer, from: staging.pointer, bytes: n * rowBytes)
        try stagingFree.record(on: ctx.device.stream)
    }

    // Checkpoint offloading. K = checkpointSlots.count device buffers; x_l always lives in slot l % K. Without
    // offloading K = L + 1 and none of this does anything. With it, x₀ … x_{L−K} (offloadedCount of them) also go
    // to pinned host memory; x_{L−K+1} … x_L stay in their slots until the backward has used them. Copies run on
    // `copyStream`, ordered against the main stream by events only (a missing wait is a silent race):
    //   forward   x_l written (main) → record produced[s] → copy waits, copies x_l to the host → offloadDone[s]
    //             before block l+K−1 overwrites slot s with x_{l+K}: main waits for offloadDone[s]
    //             (so each copy has blocks l … l+K−2 to hide behind)
    //   backward  once x_{m+K} is dead (after block m+K's backward, or the final norm's for m+K = L), record
    //             slotFree[s] (main) → copy waits, copies x_m back into slot s → fetched[s];
    //             before block m's recomputation: main waits for fetched[s] (blocks m+K−1 … m+1 hide the copy)
    // Every wait binds to the latest record of its event when it is queued, and each event is recorded again only
    // after its wait is queued, so one event per slot and kind suffices. Every copy-stream operation of a step ends
    // before the main stream passes the last fetched wait (block 0's), so the next step, an evaluation
    // (`forwardLoss`, which uses slots 0 and 1) or the host may reuse the slots and the host buffer freely.

    /// The device buffer x_l lives in.
    private func slot(_ l: Int) -> DeviceBuffer<UInt16> { checkpointSlots[l % checkpointSlots.count] }

    /// After the main stream wrote x_l into its slot: copies it to host memory on the copy stream (when offloaded).
    private func offload(_ l: Int, tokens n: Int) throws {
        guard l < offloadedCount, let copy = copyStream, let host = hostCheckpoints else { return }
        let s = l % checkpointSlots.count, bytes = 2 * n * config.hiddenSize
        try produced[s].record(on: context.device.stream)
        try copy.wait(for: produced[s])
        try context.device.copy(toHost: host.pointer + l * 2 * capacityTokens * config.hiddenSize, from: slot(l).pointer,
                                bytes: bytes, stream: copy)
        try offloadDone[s].record(on: copy)
    }

    /// Before the main stream writes x_l into its slot: waits until the slot's previous value, x_{l−K}, has been
    /// copied to the host.
    private func awaitOffload(beforeWriting l: Int) throws {
        let previous = l - checkpointSlots.count
        guard previous >= 0, previous < offloadedCount else { return }
        try context.device.stream.wait(for: offloadDone[l % checkpointSlots.count])
    }

    /// Once the main stream is done with the slot of x_m (it held x_{m+K}): brings x_m back from the host on the
    /// copy stream.
    private func prefetch(_ m: Int, tokens n: Int) throws {
        guard m >= 0, m < offloadedCount, let copy = copyStream, let host = hostCheckpoints else { return }
        let s = m % checkpointSlots.count, bytes = 2 * n * config.hiddenSize
        try slotFree[s].record(on: context.device.stream)
        try copy.wait(for: slotFree[s])
        try context.device.copy(toDevice: slot(m).pointer, from: host.pointer + m * 2 * capacityTokens * config.hiddenSize,
                                bytes: bytes, stream: copy)
        try fetched[s].record(on: copy)
    }

    /// Before block l's recomputation: waits until x_l is back in its slot (when it was offloaded).
    private func awaitFetch(_ l: Int) throws {
        guard l < offloadedCount else { return }
        try context.device.stream.wait(for: fetched[l % checkpointSlots.count])
    }

    // Kept attention outputs (`memory.keepAttentionOutputs`). Block l's o and lse live in attentionOutputSlots[l % S]
    // from its forward to its backward, whose recomputation then skips the attention forward. Without offloading,
    // S = L (each block its own, nothing to copy). With it, S = 2, and the blocks whose slot block l+2 overwrites
    // (l < L − 2) go to pinned host memory and back on `copyStream`, ordered by events as the checkpoints are:
    //   forward   o_l, lse_l written (main) → record attentionProduced[s] → copy waits, copies to the host →
    //             attentionOffloadDone[s]; before block l+2's forward: main waits for attentionOffloadDone[s]
    //   backward  blocks L−1 and L−2 find theirs still in their slots; after block l's backward, record
    //             attentionSlotFree[s] (main) → copy waits, brings block l−2's back into slot s → attentionFetched[s];
    //             before block l−2's recomputation: main waits for attentionFetched[s]
    // The last fetch (block 0's or 1's) is waited for before its recomputation, so a step leaves no copy pending.

    /// Points `attended` and `lse` at block l's slot; with offloading, first waits until the slot may be written
    /// (forward: block l−2's copy out is done) or holds block l's values again (backward).
    private func useAttentionSlot(of l: Int, forward: Bool) throws {
        guard memory.keepAttentionOutputs else { return }
        let s = l % attentionOutputSlots.count
        (attended, lse) = attentionOutputSlots[s]
        guard offloadedAttentionCount > 0 else { return }
        if forward, l >= 2, l - 2 < offloadedAttentionCount {
            try context.device.stream.wait(for: attentionOffloadDone[s])
        } else if !forward, l < offloadedAttentionCount {
            try context.device.stream.wait(for: attentionFetched[s])
        }
    }

    /// Host offsets of block l's o and lse in `hostAttention` (room for the capacity's tokens).
    private func hostAttentionOffsets(_ l: Int) -> (o: Int, lse: Int) {
        let c = config, oBytes = 2 * capacityTokens * c.qDim
        return (l * oBytes, offloadedAttentionCount * oBytes + l * 4 * capacityTokens * c.headCount)
    }

    /// After block l's forward: its o and lse to the host on the copy stream (when its slot will be overwritten).
    private func offloadAttention(_ l: Int, tokens n: Int) throws {
        guard l < offloadedAttentionCount, let copy = copyStream, let host = hostAttention else { return }
        let s = l % attentionOutputSlots.count, (o, lse) = attentionOutputSlots[s], at = hostAttentionOffsets(l)
        try attentionProduced[s].record(on: context.device.stream)
        try copy.wait(for: attentionProduced[s])
        try context.device.copy(toHost: host.pointer + at.o, from: o.pointer, bytes: 2 * n * config.qDim, stream: copy)
        try context.device.copy(toHost: host.pointer + at.lse, from: lse.pointer, bytes: 4 * n * config.headCount, stream: copy)
        try attentionOffloadDone[s].record(on: copy)
    }

    /// After block m+2's backward (the slot's last reader): block m's o and lse back into their slot.
    private func prefetchAttention(_ m: Int, tokens n: Int) throws {
        guard m >= 0, m < offloadedAttentionCount, let copy = copyStream, let host = hostAttention else { return }
        let s = m % attentionOutputSlots.count, (o, lse) = attentionOutputSlots[s], at = hostAttentionOffsets(m)
        try attentionSlotFree[s].record(on: context.device.stream)
        try copy.wait(for: attentionSlotFree[s])
        try context.device.copy(toDevice: o.pointer, from: host.pointer + at.o, bytes: 2 * n * config.qDim, stream: copy)
        try context.device.copy(toDevice: lse.pointer, from: host.pointer + at.lse, bytes: 4 * n * config.headCount, stream: copy)
        try attentionFetched[s].record(on: copy)
    }

    /// The loss of one batch without gradients (evaluation): the forward alone, with the block outputs passed
    /// between two buffers instead of kept as checkpoints, the cross-entropy without its gradient and no backward.
    /// The gradients are left as they are. Queues the work without waiting; `lastLoss()` reads the loss sum and
    /// count, which equal what `forwardBackward` reports for the same batch (the same launches up to the loss).
    public func forwardLoss(batch: TrainingBatch) throws {
        let n = batch.tokenCount
        try upload(batch)
        let headBatch = try vocabularyParallel?.exchangeCounts(n)
        // Block l reads buffers[l % 2] and writes buffers[(l + 1) % 2] (checkpoint slots, free outside a step).
        let buffers = [checkpointSlots[0], checkpointSlots[min(1, checkpointSlots.count - 1)]]
        try embed(batch, into: buffers[0])
        for (l, block) in blocks.enumerated() {
            try shardedBase?.acquire(l, next: l + 1 < blocks.count ? l + 1 : nil)
            try blockForward(block, x: buffers[l % 2], output: buffers[(l + 1) % 2], batch: batch, seeds: nil)  // no dropout
            try shardedBase?.release(l)
        }
        try headLoss(buffers[blocks.count % 2], tokens: n, headBatch: headBatch, gradientScale: nil)
    }

    /// The loss of x_L (`last`, n tokens) through the final norm and the head, a chunk of rows at a time: the row
    /// losses, and with `gradientScale` (d loss sum / d row loss) d(normed) into dNorm; then their sum and count into
    /// lossOut. With the head sharded by vocabulary (`headBatch` from `exchangeCounts`), `vocabularyParallelLoss`.
    private func headLoss(_ last: DeviceBuffer<UInt16>, tokens n: Int, headBatch: VocabularyParallelBatch?, gradientScale: Float?) throws {
        let c = config, ctx = context, h = c.hiddenSize, vocab = c.vocabularySize
        if let vocabularyParallel, let headBatch {
            try vocabularyParallelLoss(vocabularyParallel, batch: headBatch, last: last, gradientScale: gradientScale)
        } else {
            try norm(last, finalNorm, into: norm1, rows: n, dim: h)
            let blas = try ctx.blas()
            for start in stride(from: 0, to: n, by: lossChunkRows) {
                let rows = min(lossChunkRows, n - start)
                try blas.gemm(m: rows, n: vocab, k: h, a: norm1.address(at: start * h), b: head.pointer, transB: true, c: logits.pointer)
                try ctx.crossEntropyRows(logits: logits.pointer, labels: targets.address(at: start), rows: rows, vocab: vocab,
                                         gradScale: gradientScale ?? 0, rowLoss: rowLoss.address(at: start), withGradient: gradientScale != nil,
                                         softcap: c.finalLogitSoftcap)
                if gradientScale != nil {
                    try blas.gemm(m: rows, n: h, k: vocab, a: logits.pointer, b: head.pointer, c: dNorm.address(at: start * h))
                }
            }
        }
        try ctx.crossEntropyReduce(rowLoss: rowLoss, labels: targets, rows: n, into: lossOut)
    }

    /// The summed loss and the counted tokens of the latest `forwardBackward` or `forwardLoss` (waits for the GPU).
    public func lastLoss() throws -> LossSum {
        let values = try lossOut.download()
        return LossSum(sum: Double(values[0]), count: Int(values[1]))
    }

    /// Clips the gradients to global norm `maxGradNorm` (when given), then one AdamW step at `learningRate`, then
    /// refreshes the bf16 copies. Queued without waiting.
    public func optimizerStep(learningRate: Float, weightDecay: Float = 0, maxGradNorm: Float? = 1) throws {
        guard let moment1, let moment2 else {
            throw UsageError("this GPU trainer was made for the optimizer \(plan.optimizerKind?.rawValue ?? "?") and holds no AdamW moments: "
                             + "step with a CUDAOptimizer over parameterSlots()")
        }
        if let maxGradNorm { try clipGradients(maxNorm: Double(maxGradNorm)) } else { try unscaleGradients() }
        optimizerSteps += 1
        try context.adamwStep(params: params, grads: grads, m: moment1, v: moment2, count: parameterCount, step: optimizerSteps,
                              config: AdamWConfig(learningRate: learningRate, weightDecay: weightDecay))
        try context.convertToBF16(params, into: params16, count: parameterCount)
    }

    /// Divides the LoRA gradients by the loss scale they hold (nothing to do in bf16). Clipping and the optimizer
    /// step call it first. Queued without waiting.
    public func unscaleGradients() throws {
        guard gradientScale != 1 else { return }
        try context.scaleValues(grads, count: grads.count, by: 1 / gradientScale)
        gradientScale = 1
    }

    /// Clips the gradients to global norm `maxNorm` (`.infinity`: only measures the norm; `lastGradientNorm()`
    /// reads it), as `GradientClipping` does on the CPU: each tensor's Σ g² (in Double), then those sums added in
    /// tensor order, the coefficient min(1, maxNorm / (norm + 1e-6)). Queued without waiting. For use with an external
    /// optimizer (`CUDAOptimizer` over `parameterSlots()`).
    /// `sharded` (ZeRO-2): this rank sums only its own tensors (`owned`, indices into `parameterSlots()`, lying in
    /// `span` of the flat buffer) and puts 0 for the others; the sums are all-reduced over `collective` (x + 0 + … = x:
    /// every rank gets the owners' sums, so the unsharded run's norm), and only `span` is scaled.
    /// Under sharded masters (`ownedAdapters`) `span` must lie in this rank's window (the gradients it holds).
    public func clipGradients(maxNorm: Double, sharded: (owned: Range<Int>, span: Range<Int>, collective: NCCLCollective)? = nil) throws {
        let window = ownedWindow, span = sharded?.span ?? 0..<parameterCount
        guard window.lowerBound <= span.lowerBound, span.upperBound <= window.upperBound else {
            throw UsageError("clipGradients: span \(span) of the LoRA gradients outside the \(window) this rank holds (sharded masters clip their own span)")
        }
        try unscaleGradients()
        let ctx = context, count = tensorCounts.count
        let owned = sharded?.owned ?? 0..<count
        if let sharded {
            try tensorSquares.fill(byte: 0)
            try ctx.tensorSumSquares(grads, offsets: tensorOffsets, counts: tensorCounts, tensors: owned, into: tensorSquares)
            try sharded.collective.afterMainStream { try $0.reduceDoublesDevice(tensorSquares.pointer, count: count, .sum) }
        } else {
            try ctx.tensorSumSquares(grads, offsets: tensorOffsets, counts: tensorCounts, tensors: owned, into: tensorSquares)
        }
        try ctx.normFromTensorSquares(tensorSquares, count: count, maxNorm: maxNorm, into: normResult)
        try ctx.clipByCoefficient(grads.address(at: span.lowerBound - window.lowerBound), count: span.count, result: normResult)
    }

    /// Every LoRA matrix whose masters this trainer holds (all; under sharded masters its own tensors) as an optimizer
    /// slot into the flat buffers, named as the CPU trainer names them (`<module>.lora_A.weight`,
    /// `<module>.lora_B.weight`), so optimizer state is interchangeable.
    public func parameterSlots() -> [CUDAParameterSlot] {
        let window = ownedWindow
        return Self.loraTensors(blocks).filter { window.contains($0.offset) }.map {
            CUDAParameterSlot(name: $0.name, values: params, gradient: grads, count: $0.count, offset: $0.offset - window.lowerBound)
        }
    }

    /// Every LoRA tensor's name and element count in the trainer's order (what ZeRO-2's ownership is made over).
    public var loraTensorList: [(name: String, count: Int)] { Self.loraTensors(blocks).map { ($0.name, $0.count) } }

    /// Every LoRA tensor in the trainer's order (each linear with an adapter: A, then B), its name and place in the
    /// flat buffers: the optimizer's slots and the clipping norm's per-tensor sums must cover the same tensors.
    static func loraTensors(_ blocks: [TrainerBlock]) -> [(name: String, offset: Int, count: Int)] {
        blocks.flatMap { block in
            block.linears.filter { $0.rank > 0 }.flatMap { l in
                [(l.name + ".lora_A.weight", l.aOffset, l.rank * l.inFeatures), (l.name + ".lora_B.weight", l.bOffset, l.outFeatures * l.rank)]
            }
        }
    }

    /// Refreshes the bf16 copies the GEMMs read after the fp32 masters changed (an external optimizer step); under
    /// sharded masters, this rank's span (`publishOwnedParameters` then sends every span to every rank).
    public func refreshParameterCopies() throws {
        guard let owned = ownedAdapters else {
            try context.convertToBF16(params, into: params16, count: parameterCount)
            return
        }
        let window = owned.window
        guard !window.isEmpty else { return }
        try context.convertToBF16(params, into: params16.view(as: UInt16.self, at: window.lowerBound, count: window.count), count: window.count)
    }

    /// Replaces the fp32 masters (and bf16 copies) with `model`'s adapter weights (same layout as at creation).
    public func setLoRAParameters(from model: DecoderModel) throws {
        var host = [Float](repeating: 0, count: parameterCount)
        for (l, block) in blocks.enumerated() {
            for (j, linear) in block.linears.enumerated() where linear.rank > 0 {
                guard l < model.blocks.count, j < model.blocks[l].linears.count, let lora = model.blocks[l].linears[j].lora,
                      lora.a.count == linear.rank * linear.inFeatures, lora.b.count == linear.outFeatures * linear.rank else {
                    throw UsageError("the model's adapter on \(linear.name) does not match the GPU trainer's layout")
                }
                for i in 0..<lora.a.count { host[linear.aOffset + i] = lora.a.storage[i] }
                for i in 0..<lora.b.count { host[linear.bOffset + i] = lora.b.storage[i] }
            }
        }
        if ownedAdapters != nil { try writeMasters(.values(host)); return }
        try params.upload(host)
        try refreshParameterCopies()
    }

    // MARK: - Data parallel

    /// Called once block l's backward is queued on the main stream: from there on the main stream writes no more of
    /// block l's LoRA gradients (`gradientRange(ofBlock:)`) in this micro-batch. The data-parallel engine starts their
    /// all-reduce here, on a stream of its own, while the backward of the blocks below goes on.
    public var afterBlockBackward: ((_ block: Int) throws -> Void)?

    /// Block l's elements of the flat LoRA buffers (blocks lie in order, each block's linears A then B).
    public func gradientRange(ofBlock l: Int) -> Range<Int> {
        let start = blocks[l].linears.map(\.aOffset).min() ?? 0
        let end = l + 1 < blocks.count ? (blocks[l + 1].linears.map(\.aOffset).min() ?? parameterCount) : parameterCount
        return start..<end
    }

    /// The global gradient norm before the latest clipping (waits for the GPU).
    public func lastGradientNorm() throws -> Double { try normResult.download()[0] }

    /// Every LoRA gradient, (module path, dA [r·in], dB [out·r]) in fp32 (waits for the GPU).
    /// The gradients of the loss itself: a buffer still holding the loss scale is divided by it here (not in place).
    public func loraGradients() throws -> [(name: String, a: [Float], b: [Float])] {
        try requireWholeWindow("loraGradients")
        let scale = gradientScale
        return try slices(of: scale == 1 ? grads.download() : grads.download().map { $0 / scale })
    }

    /// Every LoRA matrix's fp32 master values, (module path, A, B).
    /// Under sharded masters only in a world of one (else every rank calls `gatherLoRAParameters`).
    public func loraParameters() throws -> [(name: String, a: [Float], b: [Float])] {
        try requireWholeWindow("loraParameters")
        return try slices(of: params.download())
    }

    func slices(of all: [Float]) -> [(name: String, a: [Float], b: [Float])] {
        var result: [(name: String, a: [Float], b: [Float])] = []
        for block in blocks {
            for l in block.linears where l.rank > 0 {
                let aEnd = l.aOffset + l.rank * l.inFeatures
                let bEnd = l.bOffset + l.outFeatures * l.rank
                result.append((l.name, Array(all[l.aOffset..<aEnd]), Array(all[l.bOffset..<bEnd])))
            }
        }
        return result
    }
}
