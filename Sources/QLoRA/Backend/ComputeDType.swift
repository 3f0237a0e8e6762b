// The 16-bit type the GPU computes in: activations, dequantized base weights and the LoRA copies the GEMMs read
// are stored in it, with fp32 accumulation everywhere (LoRA masters, gradients and optimizer state stay fp32).
//
// bf16 has fp32's exponent range, so nothing overflows; fp16 has 3 more mantissa bits but overflows above 65504,
// which is why training in fp16 scales the loss (`GradScaler`). Cards before Ampere (compute capability < 8.0, e.g.
// the T4) have no bf16 tensor cores, so they train in fp16; `auto` picks bf16 wherever the card has it, as
// bitsandbytes/transformers users set `bnb_4bit_compute_dtype=torch.bfloat16` on Ampere and float16 on a T4.

/// What the user asked for: `--compute-dtype auto|bf16|fp16`, or `bnb_4bit_compute_dtype` in a YAML file.
public enum ComputeDTypeChoice: String, Sendable, Equatable, CaseIterable {
    case auto, bf16, fp16

    /// "auto", "bf16"/"bfloat16", "fp16"/"float16"/"half" (transformers' and torch's spellings too, with or without "torch.").
    public init(parsing text: String, what: String = "--compute-dtype") throws {
        var name = text.lowercased().trimmingCharacters(in: " \"'")
        if name.hasPrefix("torch.") { name.removeFirst("torch.".count) }
        switch name {
        case "auto": self = .auto
        case "bf16", "bfloat16": self = .bf16
        case "fp16", "float16", "f16", "half": self = .fp16
        default:
            throw UsageError("\(what) '\(text)': expected auto, bf16 (bfloat16) or fp16 (float16)")
        }
    }

    /// The type for a card of compute capability `major.minor`: bf16 from Ampere (8.0) on, fp16 before. Asking for
    /// bf16 on a card without it is an error that says to use fp16.
    public func resolve(major: Int, minor: Int, cardName: String = "this card") throws -> ComputeDType {
        let hasBF16 = major >= 8
        switch self {
        case .auto: return hasBF16 ? .bf16 : .fp16
        case .fp16: return .fp16
        case .bf16:
            guard hasBF16 else {
                throw UsageError("--compute-dtype bf16: \(cardName) (compute capability \(major).\(minor)) has no bf16 tensor cores "
                                 + "(Ampere, 8.0, and newer do); use --compute-dtype fp16 or auto")
            }
            return .bf16
        }
    }
}

/// The 16-bit compute type of a GPU run.
public enum ComputeDType: String, Sendable, Equatable {
    case bf16, fp16

    /// torch's name, as transformers writes `bnb_4bit_compute_dtype`.
    public var torchName: String { self == .bf16 ? "bfloat16" : "float16" }

    /// Float → the type's bits, round to nearest even (fp16: beyond ±65504 is ±inf, as torch's `.half()`).
    @inline(__always)
    public func encode(_ value: Float) -> UInt16 { self == .bf16 ? floatToBF16(value) : floatToF16(value) }

    @inline(__always)
    public func decode(_ bits: UInt16) -> Float { self == .bf16 ? bf16ToFloat(bits) : f16ToFloat(bits) }

    /// The value a store in this type keeps.
    @inline(__always)
    public func round(_ value: Float) -> Float { decode(encode(value)) }

    /// The spacing of representable values just above 1 (2^-7 for bf16, 2^-10 for fp16): the relative rounding
    /// step, which the GPU checks scale their tolerances by.
    public var epsilon: Float { self == .bf16 ? 0x1p-7 : 0x1p-10 }
}

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
