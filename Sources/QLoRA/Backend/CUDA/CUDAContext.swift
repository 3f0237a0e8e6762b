// Everything one GPU needs to run the backend's ops: the device, its caching allocator, the kernel compiler
// (NVRTC + disk cache) and, on first use, cuBLASLt. The op launchers (Ops/*.swift) are extensions of this type.

/// The CUDA backend's state for one device. Use from one thread.
public final class CUDAContext {
    public let driver: CUDADriver
    public let device: CUDADevice
    public let allocator: DeviceAllocator
    public let compiler: KernelCompiler
    private var cuBLASLt: CuBLASLt?

    /// Loads the driver and NVRTC, opens device `ordinal` and makes its context current on this thread.
    /// Throws a `CUDAError` that says what to install when a library is missing, or that the card is too old.
    /// `kernelTarget` nil: `QLORA_KERNEL_ARCH` when set, else the card's own architecture.
    public init(ordinal: Int = 0, kernelCacheDirectory: String? = KernelCompiler.defaultCacheDirectory,
                kernelTarget: KernelTarget? = nil) throws {
        driver = try CUDADriver.shared()
        device = try CUDADevice(driver: driver, ordinal: ordinal)
        let (major, minor) = device.computeCapability
        guard (major, minor) >= KernelTarget.oldest else {
            throw CUDAError(call: "CUDAContext", "\(device.name) has compute capability \(major).\(minor); the CUDA backend needs 7.5 "
                                + "or newer (Turing, Ampere, Ada, Hopper, Blackwell). Use --device cpu on this machine.")
        }
        let target = try kernelTarget ?? KernelTarget.choose(deviceMajor: major, deviceMinor: minor)
        allocator = DeviceAllocator(device: device)
        compiler = KernelCompiler(device: device, nvrtc: try NVRTC(), target: target, cacheDirectory: kernelCacheDirectory)
    }

    /// What the kernels run as, for logs: "sm_90a" or "compute_86 (PTX, compiled by the driver at load)".
    public var kernelDescription: String { compiler.target.description }

    /// cuBLASLt, loaded on first use.
    public func blas() throws -> CuBLASLt {
        if let b = cuBLASLt { return b }
        let b = try CuBLASLt(device: device, allocator: allocator)
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
