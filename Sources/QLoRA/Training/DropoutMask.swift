// LoRA dropout masks, counter-based: any element of a mask is a function of (seed, index) alone, so the CPU draws
// them in a loop and the GPU in parallel, and a recomputation (gradient checkpointing) draws the same mask again.
//
//   hash(s, i)  = splitmix64(s + (i + 1)·γ),  γ = 0x9E3779B97F4A7C15,
//                 splitmix64(z) = z ⊕ (z ≫ 30) → ·0xBF58476D1CE4E5B9 → ⊕ (≫ 27) → ·0x94D049BB133111EB → ⊕ (≫ 31)
//   u(s, i)     = (hash(s, i) ≫ 40) · 2⁻²⁴                     uniform in [0, 1), 24 bits, exact in fp32
//   keep(s, i)  = u(s, i) < 1 − p   (1 − p rounded to fp32)     element i of the [tokens, in] LoRA input
//   d(x)_i      = keep(s, i) ? x_i / (1 − p) : 0
//
// hash(s, i) is exactly the (i + 1)-th draw of `SeededGenerator(seed: s)`, which is how the masks were drawn
// before this file existed, so CPU results did not change. The seeds follow the same hash: a step with dropout
// seed S gives block l the seed hash(S, l) and that block's linear j (q, k, v, o, gate, up, down) the seed
// hash(hash(S, l), j).
//
// The GPU twin is `dropout_keeps` / `dropout_keep8` in Backend/CUDA/Kernels/qlora_prelude.cuh (used by training.cu
// and the fused lora_dropout.cu); DropoutMaskTests pins values of this one, and qlora-gpu-check's "dropout mask" and
// "lora dropout fused" groups hold the GPU to it bit for bit.

public enum DropoutMask {
    /// SplitMix64's increment.
    public static let gamma: UInt64 = 0x9E37_79B9_7F4A_7C15

    /// hash(seed, index): SplitMix64's output for counter `index` of the stream `seed`.
    @inline(__always)
    public static func hash(seed: UInt64, index: UInt64) -> UInt64 {
        var z = seed &+ (index &+ 1) &* gamma
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// u(seed, index) in [0, 1) with 24 random bits.
    @inline(__always)
    public static func uniform(seed: UInt64, index: Int) -> Float {
        Float(hash(seed: seed, index: UInt64(index)) >> 40) * (1.0 / 16_777_216.0)
    }

    /// Whether element `index` survives dropout with keep probability `keep` (= 1 − p as an fp32 value).
    @inline(__always)
    public static func keeps(seed: UInt64, index: Int, keep: Float) -> Bool {
        uniform(seed: seed, index: index) < keep
    }

    /// The seed of block `block` in a step with dropout seed `stepSeed`.
    public static func blockSeed(stepSeed: UInt64, block: Int) -> UInt64 { hash(seed: stepSeed, index: UInt64(block)) }

    /// The mask seed of linear `linear` (0 q … 6 down) of a block with seed `blockSeed`.
    public static func linearSeed(blockSeed: UInt64, linear: Int) -> UInt64 { hash(seed: blockSeed, index: UInt64(linear)) }

    /// The mask seed of linear `linear` (0 q … 6 down) in block `block` of a step with dropout seed `stepSeed`.
    public static func linearSeed(stepSeed: UInt64, block: Int, linear: Int) -> UInt64 {
        linearSeed(blockSeed: blockSeed(stepSeed: stepSeed, block: block), linear: linear)
    }
}
