// NCCL (libnccl.so.2), loaded with dlopen: the collective of GPU ranks (data parallel, Parallel/Collective.swift).
//
// One process per GPU. Rank 0 makes the 128-byte unique id (ncclGetUniqueId); the launcher's rendezvous
// (Parallel/Rendezvous.swift) hands it to every rank; each rank makes its communicator with
// ncclCommInitRankScalable(&comm, W, rank, 1, &id, NULL) — the pointer form of ncclCommInitRank (NCCL ≥ 2.23), since
// ncclCommInitRank takes the id by value, a 128-byte struct that a Swift `@convention(c)` type cannot pass. NCCL reads
// the device from the current context (the runtime's cudaGetDevice sees our primary context), so a rank's
// CUDAContext is made before its communicator.
//
// NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 is set before NCCL is loaded, in every process (the launcher
// sets it for its children too).

#if canImport(Glibc)
import Glibc
#endif

/// The NCCL library and its entry points.
public final class NCCLLibrary {
    typealias Result = Int32
    typealias Comm = OpaquePointer?

    let library: DynamicLibrary
    /// The file dlopen accepted.
    public var libraryName: String { library.name }
    /// ncclGetVersion's code: 22803 for 2.28.3.
    public let version: Int

    let ncclGetVersion: @convention(c) (UnsafeMutablePointer<Int32>) -> Result
    let ncclGetUniqueId: @convention(c) (UnsafeMutableRawPointer) -> Result
    let ncclCommInitRankScalable: @convention(c) (UnsafeMutablePointer<Comm>, Int32, Int32, Int32, UnsafeMutableRawPointer, UnsafeMutableRawPointer?) -> Result
    let ncclAllReduce: @convention(c) (UnsafeRawPointer?, UnsafeMutableRawPointer?, Int, Int32, Int32, Comm, OpaquePointer?) -> Result
    /// ncclReduceScatter(sendbuff, recvbuff, recvcount, datatype, op, comm, stream): recvbuff = part `rank` (recvcount
    /// values) of the reduction of every rank's sendbuff (worldSize × recvcount values).
    let ncclReduceScatter: @convention(c) (UnsafeRawPointer?, UnsafeMutableRawPointer?, Int, Int32, Int32, Comm, OpaquePointer?) -> Result
    /// ncclReduce(sendbuff, recvbuff, count, datatype, op, root, comm, stream): recvbuff on `root` = the reduction of
    /// every rank's sendbuff (recvbuff is not written on the other ranks).
    let ncclReduce: @convention(c) (UnsafeRawPointer?, UnsafeMutableRawPointer?, Int, Int32, Int32, Int32, Comm, OpaquePointer?) -> Result
    let ncclBroadcast: @convention(c) (UnsafeRawPointer?, UnsafeMutableRawPointer?, Int, Int32, Int32, Comm, OpaquePointer?) -> Result
    /// ncclAllGather(sendbuff, recvbuff, sendcount, datatype, comm, stream): recvbuff[r·sendcount ...] = rank r's sendbuff.
    let ncclAllGather: @convention(c) (UnsafeRawPointer?, UnsafeMutableRawPointer?, Int, Int32, Comm, OpaquePointer?) -> Result
    let ncclGroupStart: @convention(c) () -> Result
    let ncclGroupEnd: @convention(c) () -> Result
    let ncclCommDestroy: @convention(c) (Comm) -> Result
    let ncclCommAbort: @convention(c) (Comm) -> Result
    let ncclGetErrorString: @convention(c) (Result) -> UnsafePointer<CChar>?
    let ncclGetLastError: @convention(c) (Comm) -> UnsafePointer<CChar>?

    /// The size of ncclUniqueId (NCCL_UNIQUE_ID_BYTES).
    public static let uniqueIDBytes = 128
    // ncclDataType_t and ncclRedOp_t values from nccl.h.
    static let float32: Int32 = 7, float64: Int32 = 8, uint8: Int32 = 1
    static let sum: Int32 = 0, average: Int32 = 4
    /// The oldest NCCL with ncclCommInitRankScalable.
    static let oldestVersion = 22300

    /// Where libnccl.so.2 is looked for: QLORA_NCCL_LIBRARY (a file), the loader's path, then PyTorch's pip wheel
    /// (site-packages/nvidia/nccl/lib) under the active virtual environment, conda, the user's and the system's Pythons.
    public static var defaultLibraryNames: [String] {
        var names: [String] = []
        if let path = environment("QLORA_NCCL_LIBRARY") { names.append(path) }
        names += ["libnccl.so.2", "libnccl.so"]
        var roots = ["VIRTUAL_ENV", "CONDA_PREFIX"].compactMap { environment($0) }.map { $0 + "/lib/python3*/site-packages" }
        if let home = environment("HOME") { roots.append(home + "/.local/lib/python3*/site-packages") }
        roots += ["/usr/local/lib/python3*/dist-packages", "/usr/local/lib/python3*/site-packages", "/usr/lib/python3/dist-packages",
                  "/usr/lib/python3*/site-packages", "/opt/conda/lib/python3*/site-packages"]
        for root in roots { names += glob(root + "/nvidia/nccl/lib/libnccl.so.2") }
        return names
    }

    static func environment(_ name: String) -> String? {
        guard let value = getenv(name).map({ String(cString: $0) }), !value.isEmpty else { return nil }
        return value
    }

    static func glob(_ pattern: String) -> [String] {
        var result = glob_t()
        defer { globfree(&result) }
        guard Glibc.glob(pattern, 0, nil, &result) == 0 else { return [] }
        return (0..<Int(result.gl_pathc)).compactMap { result.gl_pathv[$0].map { String(cString: $0) } }.sorted()
    }

    /// Keeps NVLink multicast off in this process (before NCCL reads its environment).
    public static func disableNVLinkMulticast() { setenv("NCCL_NVLS_ENABLE", "0", 1) }

    public init(libraryNames: [String] = NCCLLibrary.defaultLibraryNames) throws {
        Self.disableNVLinkMulticast()
        var errors: [String] = []
        guard let library = DynamicLibrary.open(firstOf: libraryNames, errors: &errors) else {
            throw CUDAError(call: "dlopen libnccl",
                            "NCCL (libnccl.so.2) not found; several GPUs need it. Install it ('pip install nvidia-nccl-cu12', which "
                                + "PyTorch's wheels bring, or the 'libnccl2' package), or point QLORA_NCCL_LIBRARY at libnccl.so.2. "
                                + "Tried \(libraryNames.joined(separator: ", ")). Last dlopen error: " + (errors.last ?? "not found"))
        }
        self.library = library
        do {
            ncclGetVersion = try library.function("ncclGetVersion")
            ncclGetUniqueId = try library.function("ncclGetUniqueId")
            ncclAllReduce = try library.function("ncclAllReduce")
            ncclReduceScatter = try library.function("ncclReduceScatter")
            ncclReduce = try library.function("ncclReduce")
            ncclBroadcast = try library.function("ncclBroadcast")
            ncclAllGather = try library.function("ncclAllGather")
            ncclGroupStart = try library.function("ncclGroupStart")
            ncclGroupEnd = try library.function("ncclGroupEnd")
            ncclCommDestroy = try library.function("ncclCommDestroy")
            ncclCommAbort = try library.function("ncclCommAbort")
            ncclGetErrorString = try library.function("ncclGetErrorString")
            ncclGetLastError = try library.function("ncclGetLastError")
        } catch let error as MissingSymbolError {
            throw CUDAError(call: "dlsym", "\(error); NCCL 2.23 or newer is needed")
        }
        var v: Int32 = 0
        _ = ncclGetVersion(&v)
        version = Int(v)
        guard let scalable: @convention(c) (UnsafeMutablePointer<Comm>, Int32, Int32, Int32, UnsafeMutableRawPointer, UnsafeMutableRawPointer?) -> Result
                = try? library.function("ncclCommInitRankScalable"), version >= Self.oldestVersion else {
            throw CUDAError(call: "dlsym ncclCommInitRankScalable",
                            "\(library.name) is NCCL \(Self.versionString(version)); qlora needs NCCL 2.23 or newer (ncclCommInitRankScalable)")
        }
        ncclCommInitRankScalable = scalable
    }

    /// "2.28.3" from 22803 (NCCL ≥ 2.9 codes major·10000 + minor·100 + patch).
    public static func versionString(_ code: Int) -> String { "\(code / 10000).\(code / 100 % 100).\(code % 100)" }
    public var versionString: String { Self.versionString(version) }

    /// A new unique id (rank 0 makes it; the rendezvous gives it to the others).
    public func uniqueID() throws -> [UInt8] {
        var id = [UInt8](repeating: 0, count: Self.uniqueIDBytes)
        try id.withUnsafeMutableBytes { try check(ncclGetUniqueId($0.baseAddress!), "ncclGetUniqueId", comm: nil) }
        return id
    }

    func check(_ result: Result, _ call: String, comm: Comm) throws {
        guard result != 0 else { return }
        let name = ncclGetErrorString(result).map { String(cString: $0) } ?? "error \(result)"
        let last = comm.flatMap { ncclGetLastError($0) }.map { String(cString: $0) } ?? ""
        throw CUDAError(call: call, code: result, name + (last.isEmpty ? "" : " (\(last))"))
    }
}

/// One GPU rank's NCCL communicator: the host-buffer `Collective` operations (staged through a device buffer) and
/// device-buffer all-reduces queued on a stream of their own (`reduceDevice`), for the gradient buckets.
public final class NCCLCollective: Collective {
    public let nccl: NCCLLibrary
    public let context: CUDAContext
    public let rank: Int
    public let worldSize: Int
    /// The stream collectives run on, apart from the compute stream.
    public let stream: CUDAStream
    private var comm: OpaquePointer?
    private var staging: DeviceBuffer<UInt8>?

    /// Joins the communicator of `worldSize` ranks named by `uniqueID` (the same 128 bytes on every rank) as `rank`,
    /// on `context`'s device. Returns when every rank has joined.
    public init(nccl: NCCLLibrary, context: CUDAContext, rank: Int, worldSize: Int, uniqueID: [UInt8]) throws {
        guard uniqueID.count == NCCLLibrary.uniqueIDBytes else {
            throw UsageError("NCCL unique id of \(uniqueID.count) bytes; expected \(NCCLLibrary.uniqueIDBytes)")
        }
        guard worldSize >= 1, (0..<worldSize).contains(rank) else { throw UsageError("rank \(rank) outside a world of \(worldSize)") }
        self.nccl = nccl
        self.context = context
        self.rank = rank
        self.worldSize = worldSize
        stream = try CUDAStream(device: context.device)
        var id = uniqueID
        var c: OpaquePointer? = nil
        try id.withUnsafeMutableBytes { raw in
            try nccl.check(nccl.ncclCommInitRankScalable(&c, Int32(worldSize), Int32(rank), 1, raw.baseAddress!, nil),
                           "ncclCommInitRankScalable(rank \(rank) of \(worldSize))", comm: nil)
        }
        comm = c
    }

    deinit { if let comm { _ = nccl.ncclCommDestroy(comm) } }

    /// Queues an in-place all-reduce of `count` fp32 values at `pointer` on `stream` (this collective's own stream
    /// when nil); returns without waiting.
    public func reduceDevice(_ pointer: CUdeviceptr, count: Int, _ operation: ReduceOperation, stream: CUDAStream? = nil) throws {
        try allReduceDevice(pointer, count: count, type: NCCLLibrary.float32, "floats", operation, stream: stream)
    }

    /// Queues an in-place all-reduce of `count` fp64 values at `pointer` (the clipping norm's per-tensor sums).
    public func reduceDoublesDevice(_ pointer: CUdeviceptr, count: Int, _ operation: ReduceOperation, stream: CUDAStream? = nil) throws {
        try allReduceDevice(pointer, count: count, type: NCCLLibrary.float64, "doubles", operation, stream: stream)
    }

    private func allReduceDevice(_ pointer: CUdeviceptr, count: Int, type: Int32, _ what: String, _ operation: ReduceOperation,
                                 stream: CUDAStream?) throws {
        guard count > 0 else { return }
        let p = UnsafeMutableRawPointer(bitPattern: UInt(pointer))
        try nccl.check(nccl.ncclAllReduce(UnsafeRawPointer(p), p, count, type, operation == .sum ? NCCLLibrary.sum : NCCLLibrary.average,
                                          comm, (stream ?? self.stream).handle), "ncclAllReduce(\(count) \(what))", comm: comm)
    }

    /// Queues an in-place reduce (sum) of `count` fp32 values at `pointer` to `root` (ncclReduce: the sum lands on the
    /// root only) on `stream` (default: this collective's). The ZeRO-2 gradients go to their owners this way.
    public func reduceDevice(_ pointer: CUdeviceptr, count: Int, root: Int, stream: CUDAStream? = nil) throws {
        guard count > 0 else { return }
        guard (0..<worldSize).contains(root) else { throw UsageError("ncclReduce to rank \(root) in a world of \(worldSize)") }
        let p = UnsafeMutableRawPointer(bitPattern: UInt(pointer))
        try nccl.check(nccl.ncclReduce(UnsafeRawPointer(p), p, count, NCCLLibrary.float32, NCCLLibrary.sum, Int32(root), comm,
                                       (stream ?? self.stream).handle), "ncclReduce(\(count) floats to rank \(root))", comm: comm)
    }

    private var mainDone: CUDAEvent?, collectiveDone: CUDAEvent?

    /// Queues `body`'s collectives on this collective's stream after everything the compute stream has queued so far,
    /// and makes the compute stream wait for them (events both ways; the host does not wait).
    public func afterMainStream(_ body: (NCCLCollective) throws -> Void) throws {
        let device = context.device
        if mainDone == nil {
            mainDone = try CUDAEvent(device: device, timing: false)
            collectiveDone = try CUDAEvent(device: device, timing: false)
        }
        guard let mainDone, let collectiveDone else { return }
        try mainDone.record(on: device.stream)
        try stream.wait(for: mainDone)
        try body(self)
        try collectiveDone.record(on: stream)
        try device.stream.wait(for: collectiveDone)
    }

    /// Queues the collectives `body` issues as one NCCL group (ncclGroupStart / ncclGroupEnd): several reduces or
    /// broadcasts to different roots then run together instead of one after another.
    public func group(_ body: () throws -> Void) throws {
        try nccl.check(nccl.ncclGroupStart(), "ncclGroupStart", comm: comm)
        var failure: Error?
        do { try body() } catch { failure = error }
        // The group is closed even when a call failed, so NCCL is not left inside it.
        try nccl.check(nccl.ncclGroupEnd(), "ncclGroupEnd", comm: comm)
        if let failure { throw failure }
    }

    /// Queues a reduce-scatter (the sum) of `worldSize × count` fp32 values at `values` into this rank's part, `count`
    /// values at `shard`, on `stream` (this collective's own when nil); returns without waiting. In place when `shard`
    /// is `values + rank × count` floats, as NCCL allows. Sums only: NCCL 2.28.3's out-of-place ncclAvg reduce-scatter
    /// over one rank left the last count mod 32 values of the output unwritten (sessions 8-11's GPU checks; the sum,
    /// in place or not, was exact), so an average divides after the sum (`reduceScatter` below).
    public func reduceScatterDevice(_ values: CUdeviceptr, into shard: CUdeviceptr, count: Int, stream: CUDAStream? = nil) throws {
        guard count > 0 else { return }
        try nccl.check(nccl.ncclReduceScatter(UnsafeRawPointer(bitPattern: UInt(values)), UnsafeMutableRawPointer(bitPattern: UInt(shard)),
                                              count, NCCLLibrary.float32, NCCLLibrary.sum, comm, (stream ?? self.stream).handle),
                       "ncclReduceScatter(\(count) floats to each of \(worldSize) ranks)", comm: comm)
    }

    /// Queues an in-place broadcast of `bytes` bytes at `pointer` from `root` on `stream` (default: this collective's).
    public func broadcastDevice(_ pointer: CUdeviceptr, bytes: Int, root: Int, stream: CUDAStream? = nil) throws {
        guard bytes > 0 else { return }
        let p = UnsafeMutableRawPointer(bitPattern: UInt(pointer))
        try nccl.check(nccl.ncclBroadcast(UnsafeRawPointer(p), p, bytes, NCCLLibrary.uint8, Int32(root), comm, (stream ?? self.stream).handle),
                       "ncclBroadcast(\(bytes) bytes from rank \(root))", comm: comm)
    }

    /// Queues an all-gather of `bytes` bytes per rank from `shard` into `gathered` (worldSize × bytes; rank r's part at
    /// r × bytes) on `stream` (default: this collective's); returns without waiting. In place when `shard` is
    /// `gathered + rank × bytes`, as NCCL allows.
    public func allGatherDevice(_ shard: CUdeviceptr, into gathered: CUdeviceptr, bytes: Int, stream: CUDAStream? = nil) throws {
        guard bytes > 0 else { return }
        try nccl.check(nccl.ncclAllGather(UnsafeRawPointer(bitPattern: UInt(shard)), UnsafeMutableRawPointer(bitPattern: UInt(gathered)),
                                          bytes, NCCLLibrary.uint8, comm, (stream ?? self.stream).handle),
                       "ncclAllGather(\(bytes) bytes from each of \(worldSize) ranks)", comm: comm)
    }

    private func stagingBuffer(bytes: Int) throws -> DeviceBuffer<UInt8> {
        if let staging, staging.count >= bytes { return staging }
        let buffer = try context.allocator.buffer(UInt8.self, count: max(bytes, 256))
        staging = buffer
        return buffer
    }

    /// Host values through the staging buffer: upload, reduce, download, all on this collective's stream.
    private func reduceHost(_ base: UnsafeMutableRawPointer?, count: Int, elementBytes: Int, type: Int32, _ operation: ReduceOperation) throws {
        guard count > 0, let base else { return }
        let bytes = count * elementBytes
        let buffer = try stagingBuffer(bytes: bytes)
        try context.device.copy(toDevice: buffer.pointer, from: base, bytes: bytes, stream: stream)
        let p = UnsafeMutableRawPointer(bitPattern: UInt(buffer.pointer))
        try nccl.check(nccl.ncclAllReduce(UnsafeRawPointer(p), p, count, type, operation == .sum ? NCCLLibrary.sum : NCCLLibrary.average,
                                          comm, stream.handle), "ncclAllReduce(\(count) values)", comm: comm)
        try context.device.copy(toHost: base, from: buffer.pointer, bytes: bytes, stream: stream)
        try stream.synchronize()
    }

    public func allReduce(_ values: UnsafeMutableBufferPointer<Float>, _ operation: ReduceOperation) throws {
        try reduceHost(values.baseAddress.map(UnsafeMutableRawPointer.init), count: values.count, elementBytes: 4, type: NCCLLibrary.float32, operation)
    }

    public func allReduce(_ values: UnsafeMutableBufferPointer<Double>, _ operation: ReduceOperation) throws {
        try reduceHost(values.baseAddress.map(UnsafeMutableRawPointer.init), count: values.count, elementBytes: 8, type: NCCLLibrary.float64, operation)
    }

    public func reduceScatter(_ values: UnsafeBufferPointer<Float>, into shard: UnsafeMutableBufferPointer<Float>,
                              _ operation: ReduceOperation) throws {
        try checkScatterSizes(values: values.count, shard: shard.count, worldSize: worldSize)
        guard let source = values.baseAddress, let target = shard.baseAddress, shard.count > 0 else { return }
        // The staging buffer holds every part; this rank's part of the sum lands in its own place (in place).
        let buffer = try stagingBuffer(bytes: 4 * values.count)
        try context.device.copy(toDevice: buffer.pointer, from: source, bytes: 4 * values.count, stream: stream)
        let mine = buffer.pointer + CUdeviceptr(4 * rank * shard.count)
        try reduceScatterDevice(buffer.pointer, into: mine, count: shard.count)
        try context.device.copy(toHost: target, from: mine, bytes: 4 * shard.count, stream: stream)
        try stream.synchronize()
        if operation == .average {
            let w = Float(worldSize)
            for i in 0..<shard.count { shard[i] /= w }
        }
    }

    public func broadcast(_ bytes: UnsafeMutableRawBufferPointer, root: Int) throws {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        let buffer = try stagingBuffer(bytes: bytes.count)
        try context.device.copy(toDevice: buffer.pointer, from: base, bytes: bytes.count, stream: stream)
        try broadcastDevice(buffer.pointer, bytes: bytes.count, root: root)
        try context.device.copy(toHost: base, from: buffer.pointer, bytes: bytes.count, stream: stream)
        try stream.synchronize()
    }

    public func allGather(_ shard: UnsafeRawBufferPointer, into gathered: UnsafeMutableRawBufferPointer) throws {
        try checkGatherSizes(shard: shard.count, gathered: gathered.count, worldSize: worldSize)
        guard let source = shard.baseAddress, let target = gathered.baseAddress, shard.count > 0 else { return }
        // The staging buffer holds the gathered bytes; this rank's shard is uploaded into its own place (in place).
        let buffer = try stagingBuffer(bytes: gathered.count)
        let mine = buffer.pointer + CUdeviceptr(rank * shard.count)
        try context.device.copy(toDevice: mine, from: source, bytes: shard.count, stream: stream)
        try allGatherDevice(mine, into: buffer.pointer, bytes: shard.count)
        try context.device.copy(toHost: target, from: buffer.pointer, bytes: gathered.count, stream: stream)
        try stream.synchronize()
    }

    public func barrier() throws {
        var one: [Float] = [1]
        try allReduce(&one, .sum)
    }

    /// Aborts the communicator (ranks blocked in a collective with this one are released by NCCL's own error handling,
    /// or by the launcher, which stops every rank when one fails).
    public func abort(_ message: String) {
        if let comm { _ = nccl.ncclCommAbort(comm) }
        comm = nil
    }
}
