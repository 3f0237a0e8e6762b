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
    /// Throws a `CUDAError` that says what to install when a library is missing.
    public init(ordinal: Int = 0, kernelCacheDirectory: String? = KernelCompiler.defaultCacheDirectory) throws {
        driver = try CUDADriver.shared()
        device = try CUDADevice(driver: driver, ordinal: ordinal)
        allocator = DeviceAllocator(device: device)
        compiler = KernelCompiler(device: device, nvrtc: try NVRTC(), cacheDirectory: kernelCacheDirectory)
    }

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

    /// Throws a `CUDAError` naming `op` unless `condition` holds (shape and size checks before a launch).
    func require(_ condition: Bool, _ op: String, _ message: @autoclosure () -> String) throws {
        if !condition { throw CUDAError(call: op, message()) }
    }
}
