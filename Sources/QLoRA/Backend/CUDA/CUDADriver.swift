// The CUDA driver API (libcuda.so.1), loaded at run time with dlopen.
//
// Only the calls this backend needs are declared, each as a Swift `@convention(c)` type matching the C
// prototype in cuda.h (CUresult = int; CUdevice = int; CUdeviceptr = unsigned long long; contexts, streams,
// events, modules and functions are opaque pointers). Where cuda.h maps a name onto a versioned symbol
// (`#define cuMemAlloc cuMemAlloc_v2`), the versioned symbol is bound, since that is what the library exports.
// Every return code is checked: a failure becomes a `CUDAError` naming the call and carrying the driver's
// own error string.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// A device address (CUdeviceptr).
public typealias CUdeviceptr = UInt64

/// A failure in the CUDA stack: a library that is missing, a driver/NVRTC/cuBLASLt call that failed,
/// or a kernel that did not compile. `description` names the call and says what went wrong.
public struct CUDAError: Error, CustomStringConvertible {
    /// The call or step that failed: "cuMemAlloc", "dlopen libcuda.so.1", "nvrtcCompileProgram(nf4.cu)".
    public let call: String
    /// The library's status code, when there is one.
    public let code: Int32?
    /// What went wrong (the library's error string, or our explanation).
    public let message: String

    public init(call: String, code: Int32? = nil, _ message: String) {
        self.call = call
        self.code = code
        self.message = message
    }

    /// CUDA_ERROR_OUT_OF_MEMORY from a driver call.
    public var isOutOfMemory: Bool { code == 2 && call.hasPrefix("cu") && !call.hasPrefix("cublas") }

    public var description: String {
        if let code { return "\(call) failed (\(code)): \(message)" }
        return "\(call): \(message)"
    }
}

/// The bound entry points of libcuda.so.1. Use `CUDADriver.shared()` (loads once) and open a `CUDADevice`.
public final class CUDADriver {
    typealias Result = Int32
    typealias Handle = OpaquePointer?

    let library: DynamicLibrary
    /// The driver's CUDA version as an integer, 1000*major + 10*minor (13000 for CUDA 13.0).
    public private(set) var version: Int32 = 0

    // Initialisation and devices.
    let cuInit: @convention(c) (UInt32) -> Result
    let cuDriverGetVersion: @convention(c) (UnsafeMutablePointer<Int32>) -> Result
    let cuGetErrorString: @convention(c) (Result, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> Result
    let cuGetErrorName: @convention(c) (Result, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> Result
    let cuDeviceGetCount: @convention(c) (UnsafeMutablePointer<Int32>) -> Result
    let cuDeviceGet: @convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Result
    let cuDeviceGetName: @convention(c) (UnsafeMutablePointer<CChar>, Int32, Int32) -> Result
    let cuDeviceGetAttribute: @convention(c) (UnsafeMutablePointer<Int32>, Int32, Int32) -> Result
    let cuDeviceTotalMem: @convention(c) (UnsafeMutablePointer<Int>, Int32) -> Result
    // Contexts.
    let cuDevicePrimaryCtxRetain: @convention(c) (UnsafeMutablePointer<Handle>, Int32) -> Result
    let cuDevicePrimaryCtxRelease: @convention(c) (Int32) -> Result
    let cuCtxSetCurrent: @convention(c) (Handle) -> Result
    let cuCtxSynchronize: @convention(c) () -> Result
    // Memory.
    let cuMemGetInfo: @convention(c) (UnsafeMutablePointer<Int>, UnsafeMutablePointer<Int>) -> Result
    let cuMemAlloc: @convention(c) (UnsafeMutablePointer<CUdeviceptr>, Int) -> Result
    let cuMemFree: @convention(c) (CUdeviceptr) -> Result
    let cuMemAllocHost: @convention(c) (UnsafeMutablePointer<UnsafeMutableRawPointer?>, Int) -> Result
    let cuMemFreeHost: @convention(c) (UnsafeMutableRawPointer?) -> Result
    let cuMemcpyHtoDAsync: @convention(c) (CUdeviceptr, UnsafeRawPointer?, Int, Handle) -> Result
    let cuMemcpyDtoHAsync: @convention(c) (UnsafeMutableRawPointer?, CUdeviceptr, Int, Handle) -> Result
    let cuMemcpyDtoDAsync: @convention(c) (CUdeviceptr, CUdeviceptr, Int, Handle) -> Result
    let cuMemsetD8Async: @convention(c) (CUdeviceptr, UInt8, Int, Handle) -> Result
    // Streams and events.
    let cuStreamCreate: @convention(c) (UnsafeMutablePointer<Handle>, UInt32) -> Result
    let cuStreamDestroy: @convention(c) (Handle) -> Result
    let cuStreamSynchronize: @convention(c) (Handle) -> Result
    let cuStreamWaitEvent: @convention(c) (Handle, Handle, UInt32) -> Result
    let cuEventCreate: @convention(c) (UnsafeMutablePointer<Handle>, UInt32) -> Result
    let cuEventDestroy: @convention(c) (Handle) -> Result
    let cuEventRecord: @convention(c) (Handle, Handle) -> Result
    let cuEventSynchronize: @convention(c) (Handle) -> Result
    let cuEventElapsedTime: @convention(c) (UnsafeMutablePointer<Float>, Handle, Handle) -> Result
    // Modules and launches.
    let cuModuleLoadData: @convention(c) (UnsafeMutablePointer<Handle>, UnsafeRawPointer?) -> Result
    let cuModuleUnload: @convention(c) (Handle) -> Result
    let cuModuleGetFunction: @convention(c) (UnsafeMutablePointer<Handle>, Handle, UnsafePointer<CChar>) -> Result
    let cuFuncSetAttribute: @convention(c) (Handle, Int32, Int32) -> Result
    let cuLaunchKernel: @convention(c) (
        Handle, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, Handle,
        UnsafeMutablePointer<UnsafeMutableRawPointer?>?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?
    ) -> Result

    /// The library names tried, in order.
    public static let defaultLibraryNames = ["libcuda.so.1", "libcuda.so"]

    /// Loads the driver library and calls cuInit. Throws a `CUDAError` that says what to install when the
    /// library is missing, and the driver's message when initialisation fails (no GPU, driver/kernel mismatch).
    public init(libraryNames: [String] = CUDADriver.defaultLibraryNames) throws {
        var errors: [String] = []
        guard let library = DynamicLibrary.open(firstOf: libraryNames, errors: &errors) else {
            throw CUDAError(
                call: "dlopen \(libraryNames.joined(separator: ", "))",
                "no CUDA driver found. The CUDA backend needs the NVIDIA driver's libcuda.so.1 (install the "
                    + "NVIDIA GPU driver, e.g. the 'nvidia-driver' or 'libnvidia-compute' package, or run with "
                    + "--device cpu). dlopen said: \(errors.last ?? "not found")")
        }
        self.library = library
        do {
            cuInit = try library.function("cuInit")
            cuDriverGetVersion = try library.function("cuDriverGetVersion")
            cuGetErrorString = try library.function("cuGetErrorString")
            cuGetErrorName = try library.function("cuGetErrorName")
            cuDeviceGetCount = try library.function("cuDeviceGetCount")
            cuDeviceGet = try library.function("cuDeviceGet")
            cuDeviceGetName = try library.function("cuDeviceGetName")
            cuDeviceGetAttribute = try library.function("cuDeviceGetAttribute")
            cuDeviceTotalMem = try library.function("cuDeviceTotalMem_v2")
            cuDevicePrimaryCtxRetain = try library.function("cuDevicePrimaryCtxRetain")
            cuDevicePrimaryCtxRelease = try library.function("cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease")
            cuCtxSetCurrent = try library.function("cuCtxSetCurrent")
            cuCtxSynchronize = try library.function("cuCtxSynchronize")
            cuMemGetInfo = try library.function("cuMemGetInfo_v2")
            cuMemAlloc = try library.function("cuMemAlloc_v2")
            cuMemFree = try library.function("cuMemFree_v2")
            cuMemAllocHost = try library.function("cuMemAllocHost_v2")
            cuMemFreeHost = try library.function("cuMemFreeHost")
            cuMemcpyHtoDAsync = try library.function("cuMemcpyHtoDAsync_v2")
            cuMemcpyDtoHAsync = try library.function("cuMemcpyDtoHAsync_v2")
            cuMemcpyDtoDAsync = try library.function("cuMemcpyDtoDAsync_v2")
            cuMemsetD8Async = try library.function("cuMemsetD8Async")
            cuStreamCreate = try library.function("cuStreamCreate")
            cuStreamDestroy = try library.function("cuStreamDestroy_v2")
            cuStreamSynchronize = try library.function("cuStreamSynchronize")
            cuStreamWaitEvent = try library.function("cuStreamWaitEvent")
            cuEventCreate = try library.function("cuEventCreate")
            cuEventDestroy = try library.function("cuEventDestroy_v2")
            cuEventRecord = try library.function("cuEventRecord")
            cuEventSynchronize = try library.function("cuEventSynchronize")
            cuEventElapsedTime = try library.function("cuEventElapsedTime", "cuEventElapsedTime_v2")
            cuModuleLoadData = try library.function("cuModuleLoadData")
            cuModuleUnload = try library.function("cuModuleUnload")
            cuModuleGetFunction = try library.function("cuModuleGetFunction")
            cuFuncSetAttribute = try library.function("cuFuncSetAttribute")
            cuLaunchKernel = try library.function("cuLaunchKernel")
        } catch let error as MissingSymbolError {
            throw CUDAError(call: "dlsym", "\(error); update the NVIDIA driver (CUDA 12 or newer is needed)")
        }
        try check(cuInit(0), "cuInit")
        var v: Int32 = 0
        try check(cuDriverGetVersion(&v), "cuDriverGetVersion")
        version = v
    }

    nonisolated(unsafe) private static var sharedDriver: CUDADriver?
    private static let sharedLock = PThreadLock()

    /// The process-wide driver, loaded and initialised on first use.
    public static func shared() throws -> CUDADriver {
        try sharedLock.withLock {
            if let driver = sharedDriver { return driver }
            let driver = try CUDADriver()
            sharedDriver = driver
            return driver
        }
    }

    /// Turns a CUresult into a thrown `CUDAError` carrying the driver's name and string for the code.
    func check(_ result: Result, _ call: @autoclosure () -> String) throws {
        guard result != 0 else { return }
        var name: UnsafePointer<CChar>? = nil
        var text: UnsafePointer<CChar>? = nil
        _ = cuGetErrorName(result, &name)
        _ = cuGetErrorString(result, &text)
        let message = [name, text].compactMap { $0.map { String(cString: $0) } }.joined(separator: ": ")
        throw CUDAError(call: call(), code: result, message.isEmpty ? "unknown CUDA error" : message)
    }

    /// Number of CUDA devices visible to this process.
    public func deviceCount() throws -> Int {
        var n: Int32 = 0
        try check(cuDeviceGetCount(&n), "cuDeviceGetCount")
        return Int(n)
    }
}

// MARK: - Device and context

/// One GPU with its primary context made current on the calling thread, and a default stream.
public final class CUDADevice {
    public let driver: CUDADriver
    public let ordinal: Int32
    let context: OpaquePointer?
    /// The device's marketing name, e.g. "NVIDIA H100 80GB HBM3".
    public let name: String
    /// Compute capability (9, 0 on Hopper).
    public let computeCapability: (major: Int, minor: Int)
    public let multiprocessorCount: Int
    /// Largest dynamic shared memory a block may opt into, in bytes.
    public let maxSharedMemoryPerBlockOptin: Int
    public let totalMemory: Int
    /// The stream ops run on unless told otherwise.
    public private(set) var stream: CUDAStream!

    // CUdevice_attribute values from cuda.h.
    static let attributeMultiprocessorCount: Int32 = 16
    static let attributeComputeCapabilityMajor: Int32 = 75
    static let attributeComputeCapabilityMinor: Int32 = 76
    static let attributeMaxSharedMemoryPerBlockOptin: Int32 = 97

    /// Opens device `ordinal`, retains its primary context and makes it current on this thread.
    public init(driver: CUDADriver, ordinal: Int = 0) throws {
        self.driver = driver
        let count = try driver.deviceCount()
        guard ordinal < count else {
            throw CUDAError(call: "cuDeviceGet", "device \(ordinal) asked for, but \(count) CUDA device(s) are visible")
        }
        var dev: Int32 = 0
        try driver.check(driver.cuDeviceGet(&dev, Int32(ordinal)), "cuDeviceGet(\(ordinal))")
        self.ordinal = dev
        var ctx: OpaquePointer? = nil
        try driver.check(driver.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain")
        context = ctx
        try driver.check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        var nameBytes = [CChar](repeating: 0, count: 256)
        try driver.check(driver.cuDeviceGetName(&nameBytes, 255, dev), "cuDeviceGetName")
        name = String(cString: nameBytes)
        func attribute(_ a: Int32) throws -> Int {
            var v: Int32 = 0
            try driver.check(driver.cuDeviceGetAttribute(&v, a, dev), "cuDeviceGetAttribute(\(a))")
            return Int(v)
        }
        computeCapability = (try attribute(Self.attributeComputeCapabilityMajor),
                             try attribute(Self.attributeComputeCapabilityMinor))
        multiprocessorCount = try attribute(Self.attributeMultiprocessorCount)
        maxSharedMemoryPerBlockOptin = try attribute(Self.attributeMaxSharedMemoryPerBlockOptin)
        var total = 0
        try driver.check(driver.cuDeviceTotalMem(&total, dev), "cuDeviceTotalMem")
        totalMemory = total
        stream = try CUDAStream(device: self)
    }

    deinit {
        stream = nil
        _ = driver.cuDevicePrimaryCtxRelease(ordinal)
    }

    /// Makes this device's context current on the calling thread (needed once per thread that uses it).
    public func makeCurrent() throws {
        try driver.check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    }

    /// Waits for all work on the device.
    public func synchronize() throws {
        try driver.check(driver.cuCtxSynchronize(), "cuCtxSynchronize")
    }

    /// Free and total device memory as the driver sees it (other processes included).
    public func memoryInfo() throws -> (free: Int, total: Int) {
        var free = 0, total = 0
        try driver.check(driver.cuMemGetInfo(&free, &total), "cuMemGetInfo")
        return (free, total)
    }

    // MARK: Raw memory (the allocator builds on these)

    /// cuMemAlloc; prefer `DeviceAllocator`, which caches blocks.
    public func rawAllocate(bytes: Int) throws -> CUdeviceptr {
        var p: CUdeviceptr = 0
        try driver.check(driver.cuMemAlloc(&p, max(bytes, 1)), "cuMemAlloc(\(bytes) bytes)")
        return p
    }

    public func rawFree(_ pointer: CUdeviceptr) throws {
        try driver.check(driver.cuMemFree(pointer), "cuMemFree")
    }

    public func copy(toDevice dst: CUdeviceptr, from src: UnsafeRawPointer, bytes: Int, stream: CUDAStream? = nil) throws {
        guard bytes > 0 else { return }
        try driver.check(driver.cuMemcpyHtoDAsync(dst, src, bytes, (stream ?? self.stream).handle), "cuMemcpyHtoDAsync")
    }

    public func copy(toHost dst: UnsafeMutableRawPointer, from src: CUdeviceptr, bytes: Int, stream: CUDAStream? = nil) throws {
        guard bytes > 0 else { return }
        try driver.check(driver.cuMemcpyDtoHAsync(dst, src, bytes, (stream ?? self.stream).handle), "cuMemcpyDtoHAsync")
    }

    public func copy(deviceTo dst: CUdeviceptr, from src: CUdeviceptr, bytes: Int, stream: CUDAStream? = nil) throws {
        guard bytes > 0 else { return }
        try driver.check(driver.cuMemcpyDtoDAsync(dst, src, bytes, (stream ?? self.stream).handle), "cuMemcpyDtoDAsync")
    }

    /// Sets `bytes` bytes at `pointer` to `value` (asynchronously on the stream).
    public func memset(_ pointer: CUdeviceptr, value: UInt8, bytes: Int, stream: CUDAStream? = nil) throws {
        guard bytes > 0 else { return }
        try driver.check(driver.cuMemsetD8Async(pointer, value, bytes, (stream ?? self.stream).handle), "cuMemsetD8Async")
    }

    // MARK: Modules and launches

    /// Loads a cubin (or PTX) image.
    public func loadModule(image: [UInt8], name: String) throws -> CUDAModule {
        var module: OpaquePointer? = nil
        try image.withUnsafeBytes { bytes in
            try driver.check(driver.cuModuleLoadData(&module, bytes.baseAddress), "cuModuleLoadData(\(name))")
        }
        return CUDAModule(device: self, handle: module, name: name)
    }

    /// Launches `function` on a grid of `grid` blocks of `block` threads.
    /// Arguments are passed by value in the order of the kernel's parameters.
    public func launch(_ function: CUDAFunction, grid: (Int, Int, Int), block: (Int, Int, Int),
                       sharedMemory: Int = 0, stream: CUDAStream? = nil, _ arguments: [KernelArgument]) throws {
        guard grid.0 > 0, grid.1 > 0, grid.2 > 0 else { return }  // nothing to do
        let handle = (stream ?? self.stream).handle
        // Each argument gets an 8-byte slot; cuLaunchKernel reads each parameter's size from the kernel's
        // signature at the slot's address (4-byte values sit in the low half: x86-64 and arm64 are little-endian).
        var slots = arguments.map { $0.bits }
        try slots.withUnsafeMutableBufferPointer { slotBuffer in
            var pointers: [UnsafeMutableRawPointer?] = (0..<slotBuffer.count).map {
                UnsafeMutableRawPointer(slotBuffer.baseAddress! + $0)
            }
            try pointers.withUnsafeMutableBufferPointer { params in
                try driver.check(
                    driver.cuLaunchKernel(
                        function.handle, UInt32(grid.0), UInt32(grid.1), UInt32(grid.2),
                        UInt32(block.0), UInt32(block.1), UInt32(block.2), UInt32(sharedMemory),
                        handle, params.baseAddress, nil),
                    "cuLaunchKernel(\(function.name), grid \(grid), block \(block), smem \(sharedMemory))")
            }
        }
    }
}

/// One kernel parameter, passed by value.
public enum KernelArgument {
    case pointer(CUdeviceptr)
    case int32(Int32)
    case int64(Int64)
    case float(Float)
    case double(Double)

    /// Shorthand for an `Int` that the kernel takes as `int`.
    public static func int(_ v: Int) -> KernelArgument { .int32(Int32(truncatingIfNeeded: v)) }

    var bits: UInt64 {
        switch self {
        case .pointer(let p): return p
        case .int32(let v): return UInt64(UInt32(bitPattern: v))
        case .int64(let v): return UInt64(bitPattern: v)
        case .float(let v): return UInt64(v.bitPattern)
        case .double(let v): return v.bitPattern
        }
    }
}

/// A loaded module (one compiled `.cu` file).
public final class CUDAModule {
    let device: CUDADevice
    let handle: OpaquePointer?
    public let name: String
    private var functions: [String: CUDAFunction] = [:]

    init(device: CUDADevice, handle: OpaquePointer?, name: String) {
        self.device = device
        self.handle = handle
        self.name = name
    }

    deinit { _ = device.driver.cuModuleUnload(handle) }

    /// The `extern "C"` kernel `symbol` of this module.
    public func function(_ symbol: String) throws -> CUDAFunction {
        if let f = functions[symbol] { return f }
        var f: OpaquePointer? = nil
        try device.driver.check(device.driver.cuModuleGetFunction(&f, handle, symbol),
                                "cuModuleGetFunction(\(name): \(symbol))")
        let function = CUDAFunction(handle: f, name: symbol)
        functions[symbol] = function
        return function
    }
}

/// A kernel entry point.
public struct CUDAFunction {
    let handle: OpaquePointer?
    public let name: String

    /// Raises the kernel's dynamic shared-memory limit (needed above 48 KB).
    public func setMaxDynamicSharedMemory(_ bytes: Int, driver: CUDADriver) throws {
        // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
        try driver.check(driver.cuFuncSetAttribute(handle, 8, Int32(bytes)), "cuFuncSetAttribute(\(name))")
    }
}

// MARK: - Streams, events, pinned memory

/// A CUDA stream (work on one stream runs in order).
public final class CUDAStream {
    let driver: CUDADriver
    let handle: OpaquePointer?

    public init(device: CUDADevice) throws {
        driver = device.driver
        var s: OpaquePointer? = nil
        try driver.check(driver.cuStreamCreate(&s, 0), "cuStreamCreate")
        handle = s
    }

    deinit { _ = driver.cuStreamDestroy(handle) }

    public func synchronize() throws {
        try driver.check(driver.cuStreamSynchronize(handle), "cuStreamSynchronize")
    }

    /// Makes work queued on this stream after this call wait until `event` completes (its latest `record` at the
    /// time of this call; a later `record` does not move the wait). Returns at once; the host does not wait.
    public func wait(for event: CUDAEvent) throws {
        try driver.check(driver.cuStreamWaitEvent(handle, event.handle, 0), "cuStreamWaitEvent")
    }
}

/// A CUDA event: a point in a stream's work, for timing device work or ordering work across streams
/// (`CUDAStream.wait(for:)`) and the host (`synchronize`).
public final class CUDAEvent {
    let driver: CUDADriver
    let handle: OpaquePointer?

    /// `timing: false` makes an event for ordering only (CU_EVENT_DISABLE_TIMING), which records and waits
    /// more cheaply; `milliseconds(since:)` then fails.
    public init(device: CUDADevice, timing: Bool = true) throws {
        driver = device.driver
        var e: OpaquePointer? = nil
        try driver.check(driver.cuEventCreate(&e, timing ? 0 : 2), "cuEventCreate")
        handle = e
    }

    deinit { _ = driver.cuEventDestroy(handle) }

    public func record(on stream: CUDAStream) throws {
        try driver.check(driver.cuEventRecord(handle, stream.handle), "cuEventRecord")
    }

    /// Waits on the host until the event's latest `record` has completed (at once when it was never recorded).
    public func synchronize() throws {
        try driver.check(driver.cuEventSynchronize(handle), "cuEventSynchronize")
    }

    /// Milliseconds between `start` and this event (both recorded, this one completed).
    public func milliseconds(since start: CUDAEvent) throws -> Double {
        var ms: Float = 0
        try driver.check(driver.cuEventElapsedTime(&ms, start.handle, handle), "cuEventElapsedTime")
        return Double(ms)
    }
}

/// Page-locked host memory (cuMemAllocHost): copies to and from it run asynchronously at full speed.
public final class PinnedHostBuffer {
    let driver: CUDADriver
    public let bytes: Int
    public let pointer: UnsafeMutableRawPointer

    public init(device: CUDADevice, bytes: Int) throws {
        driver = device.driver
        var p: UnsafeMutableRawPointer? = nil
        try driver.check(driver.cuMemAllocHost(&p, max(bytes, 1)), "cuMemAllocHost(\(bytes) bytes)")
        guard let p else { throw CUDAError(call: "cuMemAllocHost", "returned a null pointer") }
        pointer = p
        self.bytes = bytes
    }

    deinit { _ = driver.cuMemFreeHost(pointer) }
}

/// A plain mutex (FoundationEssentials has no NSLock).
final class PThreadLock: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    init() { pthread_mutex_init(&mutex, nil) }
    deinit { pthread_mutex_destroy(&mutex) }
    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body()
    }
}
