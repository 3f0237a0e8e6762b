// What the kernels are compiled for: the card's own architecture (a cubin, "sm_90a" on Hopper, "sm_86" on an
// RTX 3090), or a virtual architecture ("compute_80"), whose PTX the driver compiles for the card at load time.
//
// The kernels pick their instructions with `__CUDA_ARCH__`, so PTX for compute_80 holds only what an sm_80 card
// can run (no Hopper vector reductions), and running it on a newer card exercises the portable code paths for
// real. A virtual target also brings the limits of cards of that architecture (dynamic shared memory per block),
// so launchers choose the kernels an RTX 4090 (99 KB) would get even on an H100 (227 KB).
//
// Chosen once per process: `QLORA_KERNEL_ARCH` (e.g. compute_86, or sm_80 for a cubin of another card's
// architecture, which loads only on that card), else the card's own architecture.

#if canImport(Glibc)
import Glibc
#endif

public struct KernelTarget: Equatable, Sendable, CustomStringConvertible {
    /// The compute capability the kernels are written for.
    public var major: Int
    public var minor: Int
    /// PTX for the virtual architecture compute_XY (compiled by the driver at load) instead of a cubin.
    public var isVirtual: Bool

    /// The oldest compute capability the kernels support (Turing: mma.sync and ldmatrix).
    public static let oldest = (major: 7, minor: 5)

    public init(major: Int, minor: Int, isVirtual: Bool) {
        self.major = major
        self.minor = minor
        self.isVirtual = isVirtual
    }

    /// "sm_86", "sm_90a", "compute_80".
    public init(parsing text: String) throws {
        let lower = text.lowercased()
        let virtual = lower.hasPrefix("compute_")
        guard virtual || lower.hasPrefix("sm_") else {
            throw UsageError("kernel architecture '\(text)': expected sm_XY (a cubin, e.g. sm_86) or compute_XY (PTX, e.g. compute_80)")
        }
        var digits = lower.drop { $0 != "_" }.dropFirst()
        if digits.hasSuffix("a") { digits = digits.dropLast() }
        guard digits.count >= 2, let number = Int(digits) else {
            throw UsageError("kernel architecture '\(text)': expected two or three digits after the underscore, such as sm_86 or compute_80")
        }
        self.init(major: number / 10, minor: number % 10, isVirtual: virtual)
        guard (major, minor) >= Self.oldest else {
            throw UsageError("kernel architecture '\(text)': compute capability \(major).\(minor) is older than 7.5, the oldest the kernels support")
        }
    }

    /// The card's own architecture.
    public static func native(major: Int, minor: Int) -> KernelTarget {
        KernelTarget(major: major, minor: minor, isVirtual: false)
    }

    /// `QLORA_KERNEL_ARCH` when set, else the card's own architecture.
    public static func choose(deviceMajor: Int, deviceMinor: Int) throws -> KernelTarget {
        if let forced = getenv("QLORA_KERNEL_ARCH").map({ String(cString: $0) }), !forced.isEmpty {
            let target = try KernelTarget(parsing: forced)
            guard (target.major, target.minor) <= (deviceMajor, deviceMinor) else {
                throw UsageError("QLORA_KERNEL_ARCH=\(forced) is newer than the card (compute capability \(deviceMajor).\(deviceMinor))")
            }
            return target
        }
        return native(major: deviceMajor, minor: deviceMinor)
    }

    /// NVRTC's `-arch=` value. Hopper's cubin is arch-specific (sm_90a), which allows wgmma and setmaxnreg.
    public var nvrtcArchitecture: String {
        if isVirtual { return "compute_\(major)\(minor)" }
        return major == 9 && minor == 0 ? "sm_90a" : "sm_\(major)\(minor)"
    }

    public var description: String { nvrtcArchitecture + (isVirtual ? " (PTX, compiled by the driver at load)" : "") }

    /// Dynamic shared memory one block may opt into on cards of this architecture (CUDA programming guide, table of
    /// technical specifications): 64 KB on Turing, 163 KB on A100/Orin, 99 KB on the GeForce/L4 parts, 227 KB on Hopper
    /// and Blackwell data-centre cards.
    public var maxSharedMemoryPerBlock: Int {
        switch (major, minor) {
        case (7, _): return 64 * 1024
        case (8, 0), (8, 7): return 163 * 1024
        case (8, _): return 99 * 1024
        case (9, _), (10, _): return 227 * 1024
        default: return 99 * 1024
        }
    }

    /// Kernels built for this target may use bf16 tensor-core instructions (mma .bf16, sm_80 and later). Turing
    /// (7.5) runs the fp16 compute path (`ComputeDTypeChoice.resolve`).
    public var hasBF16TensorCores: Bool { major >= 8 }

    /// The tensor-core attention code the kernels compile to on this target (attention_mma.cu picks it with
    /// `__CUDA_ARCH__`), for the line the commands print once. `QLORA_KERNEL_ARCH=compute_75` (or compute_80) forces
    /// a portable path on a newer card.
    public var attentionPath: String {
        switch major {
        case ..<8: return "mma.sync m16n8k8 fp16 pairs, plain shared-memory copies (Turing path)"
        case 8: return "mma.sync m16n8k16, cp.async (Ampere path)"
        default: return "mma.sync m16n8k16, cp.async, vector reductions (Hopper path)"
        }
    }
}
