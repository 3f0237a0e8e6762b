// LoRA dropout masks, counter-based: any element of a mask is a function of (seed, index) alone, so the CPU draws
// them in a loop and the GPU in parallel, and a recomputation (gradient checkpointing) draws the same mask again.
//
// Each 32-bit hash serves two neighbouring elements (16 bits each), since hashing is what the GPU's fused dropout
// kernels spend their time on (session 11: half the integer work of session 5-10's one SplitMix64 per element):
//   pairHash(s, j) = fmix32(lo(z) ⊕ hi(z)),  z = s + (j + 1)·γ mod 2⁶⁴,  γ = 0x9E3779B97F4A7C15 (SplitMix64's Weyl step),
//                    fmix32(h) = h ⊕ (h ≫ 16) → ·0x85EBCA6B → ⊕ (≫ 13) → ·0xC2B2AE35 → ⊕ (≫ 16)   (MurmurHash3's finaliser)
//   u(s, i)        = bits 16·(i mod 2) … 16·(i mod 2) + 15 of pairHash(s, ⌊i/2⌋)      uniform in 0 … 65535
//   keep(s, i)     = u(s, i) < T,  T = ⌈(1 − p)·2¹⁶⌉   (1 − p rounded to fp32; ·2¹⁶ is exact)   element i of the
//                    row-major [tokens, in] LoRA input
//   d(x)_i         = keep(s, i) ? x_i / (1 − p) : 0
// An element is kept with probability T/2¹⁶, within 2⁻¹⁶ above 1 − p: the 1/(1 − p) scale makes E[d(x)] = x·(1 + δ)
// with δ < 2⁻¹⁶/(1 − p) (1.6e-5 at p = 0.05), far below bf16's rounding.
//
// The seeds are SplitMix64 draws: a step with dropout seed S gives block l the seed hash(S, l) and that block's linear
// j (q, k, v, o, gate, up, down) the seed hash(hash(S, l), j), hash(s, i) = splitmix64(s + (i + 1)·γ), the (i + 1)-th
// draw of `SeededGenerator(seed: s)`.
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

    /// pairHash(seed, pair): the 32 bits that decide elements 2·pair and 2·pair + 1 of a mask.
    @inline(__always)
    public static func pairHash(seed: UInt64, pair: UInt64) -> UInt32 {
        let z = seed &+ (pair &+ 1) &* gamma
        var h = UInt32(truncatingIfNeeded: z) ^ UInt32(truncatingIfNeeded: z >> 32)
        h ^= h >> 16
        h = h &* 0x85EB_CA6B
        h ^= h >> 13
        h = h &* 0xC2B2_AE35
        return h ^ (h >> 16)
    }

    /// u(seed, index): element `index`'s 16 random bits, 0 … 65535.
    @inline(__always)
    public static func uniform16(seed: UInt64, index: Int) -> UInt32 {
        (pairHash(seed: seed, pair: UInt64(index) >> 1) >> (16 * UInt32(index & 1))) & 0xFFFF
    }

    /// T = ⌈keep·2¹⁶⌉ (1 … 65536 for keep in (0, 1]): an element is kept when u < T.
    @inline(__always)
    public static func threshold(keep: Float) -> UInt32 { UInt32((keep * 65536).rounded(.up)) }

    /// Whether element `index` survives dropout with keep probability `keep` (= 1 − p as an fp32 value).
    @inline(__always)
    public static func keeps(seed: UInt64, index: Int, keep: Float) -> Bool {
        uniform16(seed: seed, index: index) < threshold(keep: keep)
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
