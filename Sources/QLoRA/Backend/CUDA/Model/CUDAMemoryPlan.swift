// What a GPU training run holds in device memory, computed before anything is allocated, so that running out of
// memory is an error that shows the plan and says what to lower instead of a failed cuMemAlloc deep in a step.

/// Bytes the GPU trainer will allocate, by kind.
public struct CUDAMemoryPlan: Sendable, CustomStringConvertible {
    /// NF4 codes + double-quantized absmax of the linear layers, bf16 embedding, head and norms.
    public var weights: Int
    /// LoRA matrices: fp32 master, bf16 compute copy, fp32 gradients.
    public var adapters: Int
    /// AdamW moments (two fp32 values per LoRA parameter).
    public var optimizer: Int
    /// Block inputs kept for gradient checkpointing plus one block's working activations and gradients.
    public var activations: Int
    /// The bf16 scratch a linear weight is dequantized into, the logits of one loss chunk, cuBLASLt's workspace.
    public var workspace: Int

    public var total: Int { weights + adapters + optimizer + activations + workspace }

    /// Each linear layer's [out, in] shape in the order the trainer stores them.
    static func linearShapes(_ c: LlamaConfig) -> [(out: Int, in: Int)] {
        [(c.qDim, c.hiddenSize), (c.kvDim, c.hiddenSize), (c.kvDim, c.hiddenSize), (c.hiddenSize, c.qDim),
         (c.intermediateSize, c.hiddenSize), (c.intermediateSize, c.hiddenSize), (c.hiddenSize, c.intermediateSize)]
    }

    /// Bytes of one NF4 weight of `n` values with blocksize 64 and nested blocksize 256 (rounded up per buffer).
    static func nf4Bytes(_ n: Int) -> Int {
        let blocks = (n + 63) / 64
        return DeviceAllocator.sizeClass((n + 1) / 2) + DeviceAllocator.sizeClass(blocks)
            + DeviceAllocator.sizeClass(4 * ((blocks + 255) / 256))
    }

    /// Rows of logits per cross-entropy chunk: at most 256 MiB of bf16 logits, a multiple of 64 rows.
    static func lossChunkRows(vocab: Int, tokens: Int) -> Int {
        let rows = max(64, (256 << 20) / (2 * max(vocab, 1)) / 64 * 64)
        return min(rows, max(tokens, 1))
    }

    /// The plan for LoRA rank `r` on every projection.
    public init(config c: LlamaConfig, tokens n: Int, rank r: Int, dropout: Bool = false) {
        self.init(config: c, tokens: n, ranks: Array(repeating: Array(repeating: r, count: 7), count: c.layerCount), dropout: dropout)
    }

    /// The plan for `ranks[l][j]`, the LoRA rank of block l's linear j (q, k, v, o, gate, up, down); `dropout`: some
    /// linear drops out (one [N, largest in] bf16 scratch for d(x)).
    public init(config c: LlamaConfig, tokens n: Int, ranks: [[Int]], dropout: Bool = false) {
        let s = DeviceAllocator.sizeClass
        let shapes = Self.linearShapes(c)
        var w = 0
        var largest = 0
        for (out, inF) in shapes {
            w += Self.nf4Bytes(out * inF)
            largest = max(largest, out * inF)
        }
        w *= c.layerCount
        var loraParameters = 0
        var xa = 0
        for layer in ranks {
            for (j, r) in layer.enumerated() where j < shapes.count {
                loraParameters += r * (shapes[j].out + shapes[j].in)
                xa += s(2 * n * r)
            }
        }
        let maxRank = ranks.joined().max() ?? 0
        w += s(2 * c.vocabularySize * c.hiddenSize) * (c.tieWordEmbeddings ? 1 : 2) + (2 * c.layerCount + 1) * s(2 * c.hiddenSize)
        weights = w
        adapters = s(4 * loraParameters) * 2 + s(2 * loraParameters)
        optimizer = s(4 * loraParameters) * 2
        let h = 2 * n * c.hiddenSize, q = 2 * n * c.qDim, kv = 2 * n * c.kvDim, i = 2 * n * c.intermediateSize
        // xa of every linear (kept from the forward), dy·B, and d(x) when dropping out.
        let lora = xa + s(2 * n * maxRank) + (dropout ? s(2 * n * (shapes.map(\.in).max() ?? 0)) : 0)
        activations = (c.layerCount + 1) * s(h) + 5 * s(h) + 4 * s(q) + 4 * s(kv) + 3 * s(i) + 2 * s(4 * n * c.headCount)
            + lora + 5 * s(4 * n)
        workspace = s(2 * largest) + s(2 * Self.lossChunkRows(vocab: c.vocabularySize, tokens: n) * c.vocabularySize) + (32 << 20)
    }

    public var description: String {
        let f = DeviceAllocator.format
        return "weights \(f(weights)), adapters \(f(adapters)), optimizer \(f(optimizer)), activations \(f(activations)), "
            + "workspace \(f(workspace)); total \(f(total))"
    }
}

/// Raised when the plan does not fit the GPU, or an allocation fails while following it.
public struct CUDAOutOfMemoryError: Error, CustomStringConvertible {
    public var plan: CUDAMemoryPlan
    public var freeBytes: Int
    public var detail: String

    public var description: String {
        let f = DeviceAllocator.format
        return "out of GPU memory: the training run needs \(f(plan.total)) but the GPU has \(f(freeBytes)) free (\(detail)). "
            + "Plan: \(plan). Lower --batch or --seq (activations grow with batch × seq), or the LoRA rank, "
            + "or pick a smaller model."
    }
}
