// A caching device-memory allocator.
//
// cuMemAlloc and cuMemFree are slow and synchronise the device, so blocks are never returned to the driver
// while the program runs: a freed block goes into the free list of its size class and the next request of
// that class reuses it. Size classes: multiples of 512 bytes up to 1 MiB; above that, the request rounded up
// to a multiple of max(2 MiB, 1/8 of its power of two), so at most 12.5% is wasted.
// When the driver runs out of memory, the cached blocks are released and the request tried once more; if it
// still fails, the error says how much is in use, how much is cached and what the driver reports free.
// The allocator is not thread-safe: use it from one thread (the one that owns the device's stream).

/// Device memory with a caching allocator; reports bytes in use and their high-water mark.
public final class DeviceAllocator {
    public let device: CUDADevice
    private var freeBlocks: [Int: [CUdeviceptr]] = [:]
    /// Bytes held by live buffers (rounded to size classes).
    public private(set) var currentBytes = 0
    /// High-water mark of `currentBytes`.
    public private(set) var peakBytes = 0
    /// Bytes obtained from the driver (live plus cached).
    public private(set) var reservedBytes = 0
    /// High-water mark of `reservedBytes`.
    public private(set) var peakReservedBytes = 0
    /// Number of cuMemAlloc calls made (a measure of how well the cache works).
    public private(set) var driverAllocations = 0
    /// At most this many bytes obtained from the driver (nil: as many as the GPU has). Set by a GPU memory budget
    /// (`--gpu-memory`), so a run on a large card behaves as it would on a smaller one.
    public var limitBytes: Int?

    public init(device: CUDADevice) {
        self.device = device
    }

    deinit { releaseCache() }

    /// The size class a request of `bytes` is served from.
    public static func sizeClass(_ bytes: Int) -> Int {
        let b = max(bytes, 1)
        if b <= 1 << 20 { return (b + 511) / 512 * 512 }
        let pow2 = 1 << (Int.bitWidth - 1 - b.leadingZeroBitCount)  // largest power of two <= b
        let step = max(2 << 20, pow2 / 8)
        return (b + step - 1) / step * step
    }

    /// A block of at least `bytes` bytes; returns the pointer and its size class.
    func allocateBlock(bytes: Int) throws -> (CUdeviceptr, Int) {
        let size = Self.sizeClass(bytes)
        let pointer: CUdeviceptr
        if var list = freeBlocks[size], let reused = list.popLast() {
            freeBlocks[size] = list
            pointer = reused
        } else {
            pointer = try driverAllocate(size)
        }
        currentBytes += size
        peakBytes = max(peakBytes, currentBytes)
        return (pointer, size)
    }

    private func driverAllocate(_ size: Int) throws -> CUdeviceptr {
        if let limit = limitBytes, reservedBytes + size > limit {
            releaseCache()
            guard reservedBytes + size <= limit else {
                throw CUDAError(call: "DeviceAllocator", "over the GPU memory budget asking for \(Self.format(size)): "
                                    + "\(Self.format(currentBytes)) in use by this program, budget \(Self.format(limit)) (--gpu-memory)")
            }
        }
        do {
            let p = try device.rawAllocate(bytes: size)
            note(allocated: size)
            return p
        } catch let error as CUDAError where error.isOutOfMemory {
            releaseCache()
            do {
                let p = try device.rawAllocate(bytes: size)
                note(allocated: size)
                return p
            } catch let error as CUDAError where error.isOutOfMemory {
                let free = (try? device.memoryInfo().free) ?? -1
                throw CUDAError(call: error.call, code: error.code,
                                "out of GPU memory asking for \(Self.format(size)): \(Self.format(currentBytes)) in use "
                                    + "by this program, driver reports \(Self.format(free)) free of \(Self.format(device.totalMemory))")
            }
        }
    }

    private func note(allocated size: Int) {
        driverAllocations += 1
        reservedBytes += size
        peakReservedBytes = max(peakReservedBytes, reservedBytes)
    }

    /// Returns a block to its size class's free list.
    func releaseBlock(_ pointer: CUdeviceptr, sizeClass size: Int) {
        currentBytes -= size
        freeBlocks[size, default: []].append(pointer)
    }

    /// Gives every cached (free) block back to the driver. Waits for the device first, since a kernel may still
    /// be using memory that the host already released.
    public func releaseCache() {
        guard !freeBlocks.isEmpty else { return }
        try? device.synchronize()
        for (size, list) in freeBlocks {
            for p in list {
                try? device.rawFree(p)
                reservedBytes -= size
            }
        }
        freeBlocks = [:]
    }

    /// Resets the high-water marks to the present values (to measure one phase).
    public func resetPeak() {
        peakBytes = currentBytes
        peakReservedBytes = reservedBytes
    }

    /// A device buffer of `count` elements of `T` (contents undefined).
    public func buffer<T>(_ type: T.Type = T.self, count: Int) throws -> DeviceBuffer<T> {
        precondition(count >= 0, "negative element count")
        let (pointer, size) = try allocateBlock(bytes: count * MemoryLayout<T>.stride)
        return DeviceBuffer(pointer: pointer, count: count, sizeClass: size, allocator: self)
    }

    /// A device buffer holding a copy of `values`.
    public func buffer<T>(copying values: [T]) throws -> DeviceBuffer<T> {
        let b = try buffer(T.self, count: values.count)
        try b.upload(values)
        return b
    }

    /// Bytes as GiB with two decimals ("0.63").
    public static func formatGiB(_ bytes: Int) -> String { "\((Double(bytes) / Double(1 << 30) * 100).rounded() / 100)" }

    static func format(_ bytes: Int) -> String {
        if bytes < 0 { return "?" }
        let gib = Double(bytes) / Double(1 << 30)
        if gib >= 1 { return "\((gib * 100).rounded() / 100) GiB" }
        return "\((Double(bytes) / Double(1 << 20) * 100).rounded() / 100) MiB"
    }
}

/// A typed handle to device memory from a `DeviceAllocator`; the memory goes back to the allocator's cache when
/// the handle is released. Element types are plain values: `UInt16` for bf16, `Float`, `Int32`, `UInt8`.
/// A view (`view(at:count:)`) is a handle to part of another buffer: it keeps that buffer alive and frees nothing.
public final class DeviceBuffer<T> {
    public let pointer: CUdeviceptr
    public let count: Int
    let sizeClass: Int
    let allocator: DeviceAllocator
    /// The buffer this one is a view into (nil: this handle owns its block).
    private let parent: AnyObject?

    init(pointer: CUdeviceptr, count: Int, sizeClass: Int, allocator: DeviceAllocator) {
        self.pointer = pointer
        self.count = count
        self.sizeClass = sizeClass
        self.allocator = allocator
        parent = nil
    }

    private init<P>(viewOf parent: DeviceBuffer<P>, at index: Int, count: Int) {
        pointer = parent.address(at: index)
        self.count = count
        sizeClass = 0
        allocator = parent.allocator
        self.parent = parent
    }

    deinit {
        if parent == nil { allocator.releaseBlock(pointer, sizeClass: sizeClass) }
    }

    /// Elements `index ..< index + count` of this buffer as a buffer of their own (sharing the memory; the
    /// allocator's accounting is unchanged).
    public func view(at index: Int, count: Int) -> DeviceBuffer<T> {
        precondition(index >= 0 && count >= 0 && index + count <= self.count,
                     "view of \(count) elements at \(index) in a buffer of \(self.count)")
        return DeviceBuffer(viewOf: self, at: index, count: count)
    }

    /// `count` values of type U starting at element `index` of this buffer (e.g. fp32 scratch inside a bf16 region);
    /// the start must be aligned for U.
    public func view<U>(as type: U.Type, at index: Int, count: Int) -> DeviceBuffer<U> {
        precondition(index >= 0 && count >= 0 && index * MemoryLayout<T>.stride + count * MemoryLayout<U>.stride <= byteCount
                     && (index * MemoryLayout<T>.stride) % MemoryLayout<U>.alignment == 0,
                     "view of \(count) \(U.self) at element \(index) in a buffer of \(self.count) \(T.self)")
        return DeviceBuffer<U>(viewOf: self, at: index, count: count)
    }

    public var byteCount: Int { count * MemoryLayout<T>.stride }
    /// The buffer as a kernel argument.
    public var arg: KernelArgument { .pointer(pointer) }
    /// The address of element `index` (for views into part of the buffer).
    public func address(at index: Int) -> CUdeviceptr { pointer + UInt64(index * MemoryLayout<T>.stride) }

    /// Copies `values` (at most `count` elements) to the start of the buffer.
    public func upload(_ values: [T], stream: CUDAStream? = nil) throws {
        precondition(values.count <= count, "upload of \(values.count) elements into a buffer of \(count)")
        try values.withUnsafeBytes { bytes in
            guard let base = bytes.baseAddress else { return }
            try allocator.device.copy(toDevice: pointer, from: base, bytes: bytes.count, stream: stream)
        }
    }

    /// Copies the buffer to the host, waiting for the stream.
    public func download(stream: CUDAStream? = nil) throws -> [T] {
        let s = stream ?? allocator.device.stream!
        let result = try [T](unsafeUninitializedCapacity: count) { out, initialized in
            if let base = out.baseAddress {
                try allocator.device.copy(toHost: UnsafeMutableRawPointer(base), from: pointer, bytes: byteCount, stream: s)
                try s.synchronize()
            }
            initialized = count
        }
        return result
    }

    /// Sets every byte to `byte` (0xFF makes every float and bf16 a NaN: useful to catch unwritten outputs).
    public func fill(byte: UInt8, stream: CUDAStream? = nil) throws {
        try allocator.device.memset(pointer, value: byte, bytes: byteCount, stream: stream)
    }
}
