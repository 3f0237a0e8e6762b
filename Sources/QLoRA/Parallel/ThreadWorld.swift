// N ranks as threads of one process: the stand-in for NCCL (or the socket collective) that lets the tests run the
// whole data-parallel contract (sharding, reduction, logging, saving) on the CPU without starting processes.
//
// Every operation is an exchange in two rendezvous: each rank publishes a pointer to its buffer and waits until all
// have; each then reads every rank's buffer (in rank order) into a result of its own; a second rendezvous keeps every
// buffer alive and unchanged until all have read; then each writes its result into its own buffer.

#if canImport(Glibc)
import Glibc
#endif

/// A world of `size` ranks in one process, each rank a thread with its own `ThreadCollective`.
public final class ThreadWorld: @unchecked Sendable {
    public let size: Int
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var arrived = 0
    private var generation = 0
    private var published: [UnsafeRawPointer?]
    private var counts: [Int]
    private var failure: RankFailedError?

    public init(size: Int) {
        precondition(size >= 1)
        self.size = size
        published = Array(repeating: nil, count: size)
        counts = Array(repeating: 0, count: size)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        condition.deallocate()
    }

    public func collective(rank: Int) -> ThreadCollective { ThreadCollective(world: self, rank: rank) }

    /// Runs `body` for every rank on its own thread and waits for all. A rank that throws aborts the world (the others
    /// stop at their next collective call); the first failing rank's error is rethrown. Returns the ranks' results.
    public static func run<T>(size: Int, _ body: @escaping (ThreadCollective) throws -> T) throws -> [T] {
        let world = ThreadWorld(size: size)
        let slots = (0..<size).map { _ in ResultSlot<T>() }
        var threads: [pthread_t] = []
        for rank in 0..<size {
            let collective = world.collective(rank: rank)
            let slot = slots[rank]
            let task = Box {
                do { slot.result = .success(try body(collective)) } catch {
                    slot.result = .failure(error)
                    collective.abort("\(error)")
                }
            }
            var thread = pthread_t()
            let context = Unmanaged.passRetained(task).toOpaque()
            // Threads of 16 MiB: the trainer's recursion is shallow, but its frames are not small.
            var attributes = pthread_attr_t()
            pthread_attr_init(&attributes)
            pthread_attr_setstacksize(&attributes, 16 << 20)
            let rc = pthread_create(&thread, &attributes, { raw in
                let task = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
                task.body()
                return nil
            }, context)
            pthread_attr_destroy(&attributes)
            guard rc == 0 else {
                Unmanaged<Box>.fromOpaque(context).release()
                world.fail(RankFailedError(rank: rank, "could not start its thread (pthread_create \(rc))"))
                break
            }
            threads.append(thread)
        }
        for thread in threads { pthread_join(thread, nil) }
        // The rank that failed first by itself, not one that stopped because another failed.
        let errors = slots.compactMap { slot -> Error? in if case .failure(let e)? = slot.result { return e } else { return nil } }
        if let own = errors.first(where: { !($0 is RankFailedError) }) ?? errors.first { throw own }
        if let failure = world.failure, threads.count < size { throw failure }
        return try slots.map { slot in
            guard case .success(let value)? = slot.result else { throw RankFailedError(rank: nil, "a rank did not finish") }
            return value
        }
    }

    private final class Box { let body: () -> Void; init(_ body: @escaping () -> Void) { self.body = body } }
    private final class ResultSlot<T>: @unchecked Sendable { var result: Result<T, Error>? }

    func fail(_ error: RankFailedError) {
        pthread_mutex_lock(mutex)
        if failure == nil { failure = error }
        pthread_cond_broadcast(condition)
        pthread_mutex_unlock(mutex)
    }

    /// Waits (lock held) until every rank has arrived at this rendezvous, or a rank failed.
    private func rendezvousLocked() throws {
        if let failure { throw failure }
        let mine = generation
        arrived += 1
        if arrived == size {
            arrived = 0
            generation += 1
            pthread_cond_broadcast(condition)
        } else {
            while generation == mine && failure == nil { pthread_cond_wait(condition, mutex) }
            // A rendezvous every rank reached has happened, even if a rank failed right after it.
            if generation == mine, let failure { throw failure }
        }
    }

    private func rendezvous() throws {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        try rendezvousLocked()
    }

    /// Publishes `pointer` (with `count` elements), waits for all, calls `read` with every rank's pointer, and waits
    /// again before returning (so no rank changes its buffer while another still reads it).
    func exchange(rank: Int, _ pointer: UnsafeRawPointer?, count: Int, what: String,
                  _ read: ([UnsafeRawPointer?]) throws -> Void) throws {
        pthread_mutex_lock(mutex)
        published[rank] = pointer
        counts[rank] = count
        do { try rendezvousLocked() } catch { pthread_mutex_unlock(mutex); throw error }
        let pointers = published, seen = counts
        pthread_mutex_unlock(mutex)
        var readError: Error?
        do {
            try checkSameCount(seen, what: what)
            try read(pointers)
        } catch { readError = error }
        try rendezvous()
        if let readError { throw readError }
    }
}

/// One rank's handle on a `ThreadWorld`.
public final class ThreadCollective: Collective {
    public let world: ThreadWorld
    public let rank: Int
    public var worldSize: Int { world.size }

    init(world: ThreadWorld, rank: Int) {
        self.world = world
        self.rank = rank
    }

    public func allReduce(_ values: UnsafeMutableBufferPointer<Float>, _ operation: ReduceOperation) throws {
        try reduce(values, operation)
    }

    public func allReduce(_ values: UnsafeMutableBufferPointer<Double>, _ operation: ReduceOperation) throws {
        try reduce(values, operation)
    }

    private func reduce<T: BinaryFloatingPoint>(_ values: UnsafeMutableBufferPointer<T>, _ operation: ReduceOperation) throws {
        let result = UnsafeMutableBufferPointer<T>.allocate(capacity: values.count)
        defer { result.deallocate() }
        try world.exchange(rank: rank, values.baseAddress.map(UnsafeRawPointer.init), count: values.count, what: "allReduce") { pointers in
            let sources = pointers.map { p in UnsafeBufferPointer(start: p?.assumingMemoryBound(to: T.self), count: values.count) }
            reduceInRankOrder(sources, into: result, operation)
        }
        for i in 0..<values.count { values[i] = result[i] }
    }

    public func reduceScatter(_ values: UnsafeBufferPointer<Float>, into shard: UnsafeMutableBufferPointer<Float>,
                              _ operation: ReduceOperation) throws {
        try checkScatterSizes(values: values.count, shard: shard.count, worldSize: worldSize)
        let part = shard.count, start = rank * part
        let result = UnsafeMutableBufferPointer<Float>.allocate(capacity: part)
        defer { result.deallocate() }
        // Each rank adds only its own part of every rank's buffer, in rank order (the bits of allReduce's part).
        try world.exchange(rank: rank, values.baseAddress.map(UnsafeRawPointer.init), count: values.count, what: "reduceScatter") { pointers in
            let sources = pointers.map { p in
                UnsafeBufferPointer(start: p?.assumingMemoryBound(to: Float.self).advanced(by: start), count: part)
            }
            reduceInRankOrder(sources, into: result, operation)
        }
        for i in 0..<part { shard[i] = result[i] }
    }

    public func broadcast(_ bytes: UnsafeMutableRawBufferPointer, root: Int) throws {
        guard (0..<worldSize).contains(root) else { throw UsageError("broadcast from rank \(root) in a world of \(worldSize) ranks") }
        let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 16)
        defer { copy.deallocate() }
        try world.exchange(rank: rank, bytes.baseAddress.map(UnsafeRawPointer.init), count: bytes.count, what: "broadcast") { pointers in
            if let source = pointers[root], bytes.count > 0 { copy.copyMemory(from: UnsafeRawBufferPointer(start: source, count: bytes.count)) }
        }
        if bytes.count > 0 { bytes.copyMemory(from: UnsafeRawBufferPointer(copy)) }
    }

    public func allGather(_ shard: UnsafeRawBufferPointer, into gathered: UnsafeMutableRawBufferPointer) throws {
        try checkGatherSizes(shard: shard.count, gathered: gathered.count, worldSize: worldSize)
        // Each rank reads every rank's shard into its own result while all shards are held still (the exchange's
        // second rendezvous). The shard may lie inside `gathered` (in place, as NCCL allows): only the other ranks'
        // parts are written, and no rank reads them.
        let size = shard.count
        try world.exchange(rank: rank, shard.baseAddress, count: size, what: "allGather") { pointers in
            guard size > 0 else { return }
            for (r, p) in pointers.enumerated() {
                guard let p else { throw UsageError("allGather: rank \(r) passed no buffer") }
                let target = gathered.baseAddress! + r * size
                if UnsafeRawPointer(target) == p { continue }  // in place: this rank's shard is already there
                UnsafeMutableRawBufferPointer(rebasing: gathered[(r * size)..<((r + 1) * size)]).copyMemory(from: UnsafeRawBufferPointer(start: p, count: size))
            }
        }
    }

    public func barrier() throws {
        try world.exchange(rank: rank, nil, count: 0, what: "barrier") { _ in }
    }

    public func abort(_ message: String) {
        world.fail(RankFailedError(rank: rank, message))
    }
}
