#if canImport(Glibc)
import Glibc
#endif

// Everything one GPU needs to run the backend's ops: the device, its caching allocator, the kernel compiler
// (NVRTC + disk cache) and, on first use, cuBLASLt. The op launchers (Ops/*.swift) are extensions of this type.

/// The CUDA backend's state for one device. Use from one thread.
public final class CUDAContext {
    public let driver: CUDADriver
    public let device: CUDADevice
    public let allocator: DeviceAllocator
    public let compiler: KernelCompiler
    private var cuBLASLt: CuBLASLt?

    /// The 16-bit type activations, dequantized weights and LoRA copies are stored in (every kernel and GEMM).
    public let computeDType: ComputeDType

    /// Loads the driver and NVRTC, opens device `ordinal` and makes its context current on this thread.
    /// Throws a `CUDAError` that says what to install when a library is missing, or that the card is too old.
    /// `kernelTarget` nil: `QLORA_KERNEL_ARCH` when set, else the card's own architecture. `computeDType` nil:
    /// `QLORA_COMPUTE_DTYPE` when set, else auto (bf16 where the kernel target has bf16 tensor cores, else fp16).
    public init(ordinal: Int = 0, kernelCacheDirectory: String? = KernelCompiler.defaultCacheDirectory,
                kernelTarget: KernelTarget? = nil, computeDType choice: ComputeDTypeChoice? = nil) throws {
        driver = try CUDADriver.shared()
        device = try CUDADevice(driver: driver, ordinal: ordinal)
        let (major, minor) = device.computeCapability
        guard (major, minor) >= KernelTarget.oldest else {
            throw CUDAError(call: "CUDAContext", "\(device.name) has compute capability \(major).\(minor); the CUDA backend needs 7.5 "
                                + "or newer (Turing, Ampere, Ada, Hopper, Blackwell). Use --device cpu on this machine.")
        }
        let target = try kernelTarget ?? KernelTarget.choose(deviceMajor: major, deviceMinor: minor)
        var resolvedChoice = choice ?? .auto
        if choice == nil, let text = getenv("QLORA_COMPUTE_DTYPE").map({ String(cString: $0) }), !text.isEmpty {
            resolvedChoice = try ComputeDTypeChoice(parsing: text, what: "QLORA_COMPUTE_DTYPE")
        }
        // The kernel target decides, not the card: PTX for compute_75 on an H100 has no bf16 mma either.
        computeDType = try resolvedChoice.resolve(major: target.major, minor: target.minor,
                                                  cardName: target.isVirtual || (target.major, target.minor) != (major, minor)
                                                      ? "kernel target \(target.nvrtcArchitecture)" : device.name)
        allocator = DeviceAllocator(device: device)
        compiler = KernelCompiler(device: device, nvrtc: try NVRTC(), target: target, computeDType: computeDType,
                                  cacheDirectory: kernelCacheDirectory)
        let info = try device.memoryInfo()
        contextBytes = info.total - info.free
        if let text = getenv("QLORA_GPU_MEMORY").map({ String(cString: $0) }), !text.isEmpty {
            guard let gib = Double(text), gib > 0, gib.isFinite else {
                throw UsageError("QLORA_GPU_MEMORY=\(text): expected a positive number of GiB, such as 24")
            }
            try setMemoryBudget(gib: gib)
        }
    }

    /// Device memory in use when the context was made (the CUDA context itself and, on a shared card, other
    /// processes): a budget counts it, as a card of that size would.
    public let contextBytes: Int
    /// Behave as a card with this much memory (bytes), or nil for the card's own.
    public private(set) var memoryBudget: Int?

    /// `--gpu-memory GiB`: the allocator holds at most the budget less what the context already uses, and the
    /// memory plans check against it, so a run on an 80 GB card refuses or fits exactly as on a 24 GB one.
    public func setMemoryBudget(gib: Double) throws {
        let bytes = Int(gib * Double(1 << 30))
        guard bytes <= device.totalMemory else {
            throw UsageError("--gpu-memory \(gib) GiB is more than \(device.name) has (\(DeviceAllocator.format(device.totalMemory)))")
        }
        guard bytes > contextBytes else {
            throw UsageError("--gpu-memory \(gib) GiB leaves nothing beyond the CUDA context's \(DeviceAllocator.format(contextBytes))")
        }
        memoryBudget = bytes
        allocator.limitBytes = bytes - contextBytes
    }

    /// Bytes this program may still obtain: the driver's free memory, within the budget when there is one.
    public func availableBytes() throws -> Int {
        let free = try device.memoryInfo().free
        guard let limit = allocator.limitBytes else { return free }
        return min(free, limit - allocator.currentBytes)
    }

    /// What the kernels run as, for logs: "sm_90a, bf16 compute, attention: ..." or "compute_75 (PTX, compiled by the
    /// driver at load), fp16 compute, attention: ...".
    public var kernelDescription: String {
        let choice = (try? AttentionKernel.fromEnvironment()) ?? .mma
        let wgmma = wgmmaAttentionApplies(AttentionShape(batch: 1, seq: 1, heads: 1, kvHeads: 1, headDim: 128))
        let note = !wgmma || !choice.forwardOnWGMMA ? ""
            : choice.backwardPipelined ? "; d128 flash forward and backward on wgmma, pipelined (QLORA_ATTENTION)"
            : choice.backwardOnWGMMA ? "; d128 flash forward and backward on wgmma (QLORA_ATTENTION)"
            : "; d128 flash forward on wgmma (QLORA_ATTENTION)"
        return "\(compiler.target.description), \(computeDType) compute, attention: \(compiler.target.attentionPath)" + note
    }

    /// cuBLASLt, loaded on first use.
    public func blas() throws -> CuBLASLt {
        if let b = cuBLASLt { return b }
        let b = try CuBLASLt(device: device, allocator: allocator, storage16: GEMMType(computeDType))
        cuBLASLt = b
        return b
    }

    /// Blocks for a grid-stride elementwise kernel over `items` work items of `threads` threads each:
    /// enough to fill the GPU several times over, no more.
    func gridSize(items: Int, threads: Int = 256) -> Int {
        let needed = (items + threads - 1) / threads
        return max(1, min(needed, device.multiprocessorCount * 16))
    }

    /// Lets `function` use `bytes` of dynamic shared memory (opting in above 48 KB), or throws naming `op` when the
    /// card (or the kernel target's architecture) has less.
    func allowSharedMemory(_ function: CUDAFunction, bytes: Int, _ op: String) throws {
        try require(bytes <= compiler.maxSharedMemoryPerBlock, op,
                    "needs \(bytes) bytes of shared memory per block; \(compiler.target.nvrtcArchitecture) cards have \(compiler.maxSharedMemoryPerBlock)")
        if bytes > 48 * 1024 { try function.setMaxDynamicSharedMemory(bytes, driver: driver) }
    }

    /// Throws a `CUDAError` naming `op` unless `condition` holds (shape and size checks before a launch).
    func require(_ condition: Bool, _ op: String, _ message: @autoclosure () -> String) throws {
        if !condition { throw CUDAError(call: op, message()) }
    }
}
