// The embedded kernel sources (Package.swift embeds each `.cu` file with `.embedInCode`, which generates
// `PackageResources.<file name with '.' as '_'>` as a byte array).

/// Every `.cu` file the CUDA backend compiles, one op family per file.
public enum KernelSources {
    /// Headers handed to NVRTC in memory; kernels `#include "qlora_prelude.cuh"` (and the attention kernels
    /// "attention_common.cuh").
    public static let headers: [(name: String, text: String)] = [
        ("qlora_prelude.cuh", String(decoding: PackageResources.qlora_prelude_cuh, as: UTF8.self)),
        ("attention_common.cuh", String(decoding: PackageResources.attention_common_cuh, as: UTF8.self)),
    ]

    public static let nf4 = KernelSource(name: "nf4.cu", bytes: PackageResources.nf4_cu)
    public static let rmsnorm = KernelSource(name: "rmsnorm.cu", bytes: PackageResources.rmsnorm_cu)
    public static let rope = KernelSource(name: "rope.cu", bytes: PackageResources.rope_cu)
    public static let swiglu = KernelSource(name: "swiglu.cu", bytes: PackageResources.swiglu_cu)
    public static let embedding = KernelSource(name: "embedding.cu", bytes: PackageResources.embedding_cu)
    public static let crossEntropy = KernelSource(name: "cross_entropy.cu", bytes: PackageResources.cross_entropy_cu)
    public static let adamw = KernelSource(name: "adamw.cu", bytes: PackageResources.adamw_cu)
    public static let attention = KernelSource(name: "attention.cu", bytes: PackageResources.attention_cu)
    public static let attentionMMA = KernelSource(name: "attention_mma.cu", bytes: PackageResources.attention_mma_cu)
    /// Hopper only (sm_90a): other targets compile it to an empty module.
    public static let attentionWGMMA = KernelSource(name: "attention_wgmma.cu", bytes: PackageResources.attention_wgmma_cu)
    public static let convert = KernelSource(name: "convert.cu", bytes: PackageResources.convert_cu)
    public static let decode = KernelSource(name: "decode.cu", bytes: PackageResources.decode_cu)
    public static let decodeBatched = KernelSource(name: "decode_batched.cu", bytes: PackageResources.decode_batched_cu)
    public static let random = KernelSource(name: "random.cu", bytes: PackageResources.random_cu)
    public static let adamw8bit = KernelSource(name: "adamw8bit.cu", bytes: PackageResources.adamw8bit_cu)

    public static let training = KernelSource(name: "training.cu", bytes: PackageResources.training_cu)
    public static let loraDropout = KernelSource(name: "lora_dropout.cu", bytes: PackageResources.lora_dropout_cu)

    /// All kernel files, for checks that compile everything up front.
    public static let all: [KernelSource] = [nf4, rmsnorm, rope, swiglu, embedding, crossEntropy, adamw, attention, attentionMMA, attentionWGMMA, convert, training,
                                          loraDropout, decode, decodeBatched, random, adamw8bit]
}
