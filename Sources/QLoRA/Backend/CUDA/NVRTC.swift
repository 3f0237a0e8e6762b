// NVRTC, CUDA's run-time compiler (libnvrtc.so), loaded with dlopen, and the on-disk cache of compiled kernels.
//
// Kernels are `.cu` files embedded in the binary (Package.swift: `.embedInCode`). At first use each is compiled
// for the device's own architecture (`-arch=sm_90a` on Hopper) into a cubin, which is written to
// `~/.cache/swift-qlora/kernels/<key>.cubin` (atomically) where the key hashes the source, the prelude, the
// architecture, the options and the driver and NVRTC versions; later runs load the cubin directly.
//
// NVRTC ships no `cuda_bf16.h` of its own (without `-I` to a toolkit it fails with "could not open source file"),
// and a user may have only the driver and NVRTC. So kernels include nothing but our prelude
// (`qlora_prelude.cuh`, handed to NVRTC as an in-memory header), which defines bf16 as raw 16-bit storage with
// bit-level conversions; NVRTC's built-in math and intrinsics need no header.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// The bound entry points of libnvrtc.
public final class NVRTC {
    typealias Result = Int32
    typealias Program = OpaquePointer?

    let library: DynamicLibrary
    /// NVRTC's (major, minor) version.
    public let version: (major: Int, minor: Int)

    let nvrtcVersion: @convention(c) (UnsafeMutablePointer<Int32>, UnsafeMutablePointer<Int32>) -> Result
    let nvrtcGetErrorString: @convention(c) (Result) -> UnsafePointer<CChar>?
    let nvrtcCreateProgram: @convention(c) (
        UnsafeMutablePointer<Program>, UnsafePointer<CChar>, UnsafePointer<CChar>, Int32,
        UnsafePointer<UnsafePointer<CChar>?>?, UnsafePointer<UnsafePointer<CChar>?>?
    ) -> Result
    let nvrtcCompileProgram: @convention(c) (Program, Int32, UnsafePointer<UnsafePointer<CChar>?>?) -> Result
    let nvrtcGetProgramLogSize: @convention(c) (Program, UnsafeMutablePointer<Int>) -> Result
    let nvrtcGetProgramLog: @convention(c) (Program, UnsafeMutablePointer<CChar>) -> Result
    let nvrtcGetCUBINSize: @convention(c) (Program, UnsafeMutablePointer<Int>) -> Result
    let nvrtcGetCUBIN: @convention(c) (Program, UnsafeMutablePointer<CChar>) -> Result
    let nvrtcGetPTXSize: @convention(c) (Program, UnsafeMutablePointer<Int>) -> Result
    let nvrtcGetPTX: @convention(c) (Program, UnsafeMutablePointer<CChar>) -> Result
    let nvrtcDestroyProgram: @convention(c) (UnsafeMutablePointer<Program>) -> Result

    /// Names tried in order: the unversioned development link, then CUDA 13's and 12's sonames, then the
    /// usual install folders (a toolkit under CUDA_HOME or /usr/local/cuda).
    public static var defaultLibraryNames: [String] {
        var names = ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]
        for root in [getenv("CUDA_HOME"), getenv("CUDA_PATH")].compactMap({ $0.map { String(cString: $0) } }) + ["/usr/local/cuda"] {
            names += ["\(root)/lib64/libnvrtc.so", "\(root)/lib64/libnvrtc.so.13", "\(root)/lib64/libnvrtc.so.12"]
        }
        return names
    }

    public init(libraryNames: [String] = NVRTC.defaultLibraryNames) throws {
        var errors: [String] = []
        guard let library = DynamicLibrary.open(firstOf: libraryNames, errors: &errors) else {
            throw CUDAError(
                call: "dlopen libnvrtc",
                "NVRTC (libnvrtc.so, CUDA 12 or 13) not found; the CUDA backend compiles its kernels with it. "
                    + "Install the CUDA runtime compiler (e.g. 'pip install nvidia-cuda-nvrtc' and add its lib folder "
                    + "to LD_LIBRARY_PATH, or the 'cuda-nvrtc' package), or run with --device cpu. Last dlopen error: "
                    + (errors.first ?? "not found"))
        }
        self.library = library
        do {
            nvrtcVersion = try library.function("nvrtcVersion")
            nvrtcGetErrorString = try library.function("nvrtcGetErrorString")
            nvrtcCreateProgram = try library.function("nvrtcCreateProgram")
            nvrtcCompileProgram = try library.function("nvrtcCompileProgram")
            nvrtcGetProgramLogSize = try library.function("nvrtcGetProgramLogSize")
            nvrtcGetProgramLog = try library.function("nvrtcGetProgramLog")
            nvrtcGetCUBINSize = try library.function("nvrtcGetCUBINSize")
            nvrtcGetCUBIN = try library.function("nvrtcGetCUBIN")
            nvrtcGetPTXSize = try library.function("nvrtcGetPTXSize")
            nvrtcGetPTX = try library.function("nvrtcGetPTX")
            nvrtcDestroyProgram = try library.function("nvrtcDestroyProgram")
        } catch let error as MissingSymbolError {
            throw CUDAError(call: "dlsym", "\(error); NVRTC 12 or newer is needed (it can emit cubins)")
        }
        var major: Int32 = 0, minor: Int32 = 0
        _ = nvrtcVersion(&major, &minor)
        version = (Int(major), Int(minor))
    }

    private func check(_ result: Result, _ call: String) throws {
        guard result != 0 else { return }
        let text = nvrtcGetErrorString(result).map { String(cString: $0) } ?? "unknown NVRTC error"
        throw CUDAError(call: call, code: result, text)
    }

    /// Compiles `source` (called `name` in messages) with in-memory `headers` for `options`'s architecture: a cubin
    /// for sm_XY, PTX (NUL-terminated) for compute_XY. A compile error carries the file name and NVRTC's log.
    public func compile(source: String, name: String, headers: [(name: String, text: String)] = [],
                        options: [String]) throws -> [UInt8] {
        var program: OpaquePointer? = nil
        // Keep C strings alive for the duration of the calls.
        let headerTexts = headers.map { strdup($0.text) }
        let headerNames = headers.map { strdup($0.name) }
        let optionStrings = options.map { strdup($0) }
        defer { (headerTexts + headerNames + optionStrings).forEach { free($0) } }
        let constHeaderTexts = headerTexts.map { UnsafePointer<CChar>($0) }
        let constHeaderNames = headerNames.map { UnsafePointer<CChar>($0) }
        let constOptions = optionStrings.map { UnsafePointer<CChar>($0) }

        try constHeaderTexts.withUnsafeBufferPointer { texts in
            try constHeaderNames.withUnsafeBufferPointer { names in
                try check(nvrtcCreateProgram(&program, source, name, Int32(headers.count), texts.baseAddress, names.baseAddress),
                          "nvrtcCreateProgram(\(name))")
            }
        }
        defer { _ = nvrtcDestroyProgram(&program) }

        let status = constOptions.withUnsafeBufferPointer { nvrtcCompileProgram(program, Int32(options.count), $0.baseAddress) }
        let log = programLog(program)
        if status != 0 {
            let text = nvrtcGetErrorString(status).map { String(cString: $0) } ?? "error \(status)"
            throw CUDAError(call: "nvrtcCompileProgram(\(name))", code: status,
                            "\(text) with options \(options.joined(separator: " "))\n\(log)")
        }
        // A virtual architecture (compute_XY) gives PTX text, which cuModuleLoadData takes NUL-terminated and the
        // driver compiles for the card; a real one (sm_XY) a cubin.
        let virtual = options.contains { $0.hasPrefix("-arch=compute_") }
        let (getSize, get, what) = virtual ? (nvrtcGetPTXSize, nvrtcGetPTX, "PTX") : (nvrtcGetCUBINSize, nvrtcGetCUBIN, "CUBIN")
        var size = 0
        try check(getSize(program, &size), "nvrtcGet\(what)Size(\(name))")
        guard size > 0 else {
            throw CUDAError(call: "nvrtcGet\(what)(\(name))", "no \(what) produced for options \(options.joined(separator: " "))")
        }
        var image = [UInt8](repeating: 0, count: size)
        try image.withUnsafeMutableBytes { bytes in
            try check(get(program, bytes.baseAddress!.assumingMemoryBound(to: CChar.self)), "nvrtcGet\(what)(\(name))")
        }
        return image
    }

    private func programLog(_ program: OpaquePointer?) -> String {
        var size = 0
        guard nvrtcGetProgramLogSize(program, &size) == 0, size > 1 else { return "" }
        var log = [CChar](repeating: 0, count: size + 1)
        guard nvrtcGetProgramLog(program, &log) == 0 else { return "" }
        return String(cString: log)
    }
}

// MARK: - Kernel sources and the compiled-module cache

/// One embedded `.cu` file.
public struct KernelSource {
    /// The file name, used in messages and as NVRTC's program name ("nf4.cu").
    public let name: String
    public let text: String

    public init(name: String, text: String) {
        self.name = name
        self.text = text
    }

    init(name: String, bytes: [UInt8]) {
        self.init(name: name, text: String(decoding: bytes, as: UTF8.self))
    }
}

/// Compiles kernel sources for one device, caching cubins on disk and loaded modules in memory.
public final class KernelCompiler {
    public let device: CUDADevice
    public let nvrtc: NVRTC
    /// What the kernels are built for: the card's architecture, or a virtual one (`QLORA_KERNEL_ARCH`).
    public let target: KernelTarget
    /// The kernels' 16-bit storage type (`h16` in the prelude: bf16, or fp16 with -DQLORA_HALF=1).
    public let computeDType: ComputeDType
    /// Where cubins are cached; nil disables the disk cache.
    public let cacheDirectory: String?
    /// Headers every kernel may include.
    public let headers: [(name: String, text: String)]
    private var modules: [String: CUDAModule] = [:]
    /// Counts, for the check tool: how many modules came from the disk cache and how many were compiled.
    public private(set) var cacheHits = 0
    public private(set) var compilations = 0

    /// `$QLORA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/swift-qlora/kernels`, else `~/.cache/swift-qlora/kernels`.
    public static var defaultCacheDirectory: String? {
        if let dir = getenv("QLORA_KERNEL_CACHE") { return String(cString: dir) }
        if let xdg = getenv("XDG_CACHE_HOME") { return String(cString: xdg) + "/swift-qlora/kernels" }
        if let home = getenv("HOME") { return String(cString: home) + "/.cache/swift-qlora/kernels" }
        return nil
    }

    public init(device: CUDADevice, nvrtc: NVRTC, target: KernelTarget? = nil, computeDType: ComputeDType = .bf16,
                cacheDirectory: String? = KernelCompiler.defaultCacheDirectory,
                headers: [(name: String, text: String)] = KernelSources.headers) {
        self.device = device
        self.nvrtc = nvrtc
        self.target = target ?? .native(major: device.computeCapability.major, minor: device.computeCapability.minor)
        self.computeDType = computeDType
        self.cacheDirectory = cacheDirectory
        self.headers = headers
    }

    /// Compiler options: the target architecture, C++17, IEEE-accurate math, the 16-bit type.
    public var options: [String] { Self.options(for: target, computeDType: computeDType) }

    public static func options(for target: KernelTarget, computeDType: ComputeDType = .bf16) -> [String] {
        ["-arch=\(target.nvrtcArchitecture)", "-std=c++17", "-default-device", "-DQLORA_NVRTC=1"]
            + (computeDType == .fp16 ? ["-DQLORA_HALF=1"] : [])
    }

    /// Dynamic shared memory a block may use: the card's limit, and no more than cards of the target's architecture
    /// have (so a forced compute_86 run on an H100 picks the kernels an RTX 3090 would).
    public var maxSharedMemoryPerBlock: Int { min(device.maxSharedMemoryPerBlockOptin, target.maxSharedMemoryPerBlock) }

    /// The cache key: a 128-bit hash of everything that changes the cubin.
    func cacheKey(for source: KernelSource) -> String {
        var text = source.text + "\u{0}"
        for header in headers { text += header.name + "\u{0}" + header.text + "\u{0}" }
        text += options.joined(separator: " ")
        text += "\u{0}driver \(device.driver.version) nvrtc \(nvrtc.version.major).\(nvrtc.version.minor)"
        let stem = source.name.split(separator: ".").first.map(String.init) ?? "kernel"
        return "\(stem)-\(StableHash.hex128(Array(text.utf8)))"
    }

    /// The loaded module for `source`, compiling it (or reading its cubin from the disk cache) on first use.
    public func module(_ source: KernelSource) throws -> CUDAModule {
        if let module = modules[source.name] { return module }
        let cache = cacheDirectory.map { KernelCache(directory: $0) }
        let key = cacheKey(for: source)
        if let cubin = cache?.load(key: key), let module = try? device.loadModule(image: cubin, name: source.name) {
            cacheHits += 1
            modules[source.name] = module
            return module
        }
        let cubin = try nvrtc.compile(source: source.text, name: source.name, headers: headers, options: options)
        compilations += 1
        do {
            try cache?.store(key: key, cubin: cubin)
        } catch {
            // A cache that cannot be written only costs a recompile next time.
            fputs("warning: kernel cache not written (\(error))\n", stderr)
        }
        let module = try device.loadModule(image: cubin, name: source.name)
        modules[source.name] = module
        return module
    }

    /// The kernel `symbol` from `source`.
    public func function(_ source: KernelSource, _ symbol: String) throws -> CUDAFunction {
        try module(source).function(symbol)
    }
}

/// The on-disk cubin cache: one `<key>.cubin` file per compiled kernel file, written atomically (temporary file
/// and rename), so concurrent processes and crashes never leave a half-written cubin under the final name.
public struct KernelCache {
    public let directory: String

    public init(directory: String) { self.directory = directory }

    public func path(key: String) -> String { "\(directory)/\(key).cubin" }

    /// The cached cubin, or nil when there is none (or it cannot be read, or is empty).
    public func load(key: String) -> [UInt8]? {
        let file = path(key: key)
        guard FileSystem.exists(file), let bytes = try? FileSystem.readFile(file), !bytes.isEmpty else { return nil }
        return bytes
    }

    public func store(key: String, cubin: [UInt8]) throws {
        try FileSystem.createDirectory(directory)
        try FileSystem.writeAtomically(path(key: key), bytes: cubin)
    }
}

/// A stable (process-independent) 128-bit hash: two 64-bit FNV-1a lanes with different offsets, mixed.
/// Not cryptographic; it only names cache files.
enum StableHash {
    static func hex128(_ bytes: [UInt8]) -> String {
        var a: UInt64 = 0xcbf2_9ce4_8422_2325
        var b: UInt64 = 0x6c62_272e_07bb_0142
        for byte in bytes {
            a = (a ^ UInt64(byte)) &* 0x0000_0100_0000_01b3
            b = (b ^ UInt64(byte)) &* 0x0000_0100_0000_01b3
            b = (b << 7) | (b >> 57)
        }
        func mix(_ x: UInt64) -> UInt64 {  // splitmix64 finaliser
            var z = x &+ 0x9e37_79b9_7f4a_7c15
            z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
            z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
            return z ^ (z >> 31)
        }
        let hi = mix(a ^ UInt64(bytes.count)), lo = mix(b &+ hi)
        return hex(hi) + hex(lo)
    }

    private static func hex(_ v: UInt64) -> String {
        let s = String(v, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }
}
