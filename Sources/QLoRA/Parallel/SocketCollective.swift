// The collective of CPU ranks in separate processes (or machines), over the rendezvous connections: a star around
// rank 0, as simple as a collective gets. allReduce: every other rank sends its buffer to rank 0, which adds them in
// rank order (0, 1, ..., W−1: the bits of `ThreadWorld` and of every rank alike) and sends the result back;
// reduceScatter the same, sending each rank only its part. broadcast:
// the root's bytes go through rank 0 to all. allGather: every rank sends its shard to rank 0, which puts them in rank
// order and sends the whole to all. A failure travels as an error frame, so each rank stops with the failing
// rank's message; a process that dies closes its connection, which stops the others too.
//
// It moves O(W · bytes) through rank 0, fine for LoRA gradients of CPU-sized models; GPUs use NCCL.

/// One rank of a job of processes joined at a rendezvous.
public final class SocketCollective: Collective {
    public let rank: Int
    public let worldSize: Int
    /// Rank 0: the connection of every other rank (index 0 nil). Others: only the connection to rank 0.
    private let peers: [TCPConnection?]
    private var failed: RankFailedError?

    /// Meets the other ranks (Rendezvous.swift) and keeps the connections; `payload` is what rank 0 hands to every rank
    /// (returned in `payload` on every rank).
    public init(rank: Int, worldSize: Int, host: String, port: Int, payload: [UInt8] = [], payloadBytes: Int = 0, timeout: Double) throws {
        self.rank = rank
        self.worldSize = worldSize
        if rank == 0 {
            peers = try Rendezvous.serve(port: port, worldSize: worldSize, payload: payload, timeout: timeout)
            self.payload = payload
        } else {
            let (connection, received) = try Rendezvous.join(host: host, port: port, rank: rank, worldSize: worldSize,
                                                              payloadBytes: payloadBytes, timeout: timeout)
            peers = [connection]
            self.payload = received
        }
    }

    /// The payload rank 0 handed out at the rendezvous.
    public let payload: [UInt8]

    private func guardNotFailed() throws { if let failed { throw failed } }

    /// Rank 0 forwards a failure it learned of to every other rank, then stops.
    private func spread(_ error: Error) -> Error {
        let failure = (error as? RankFailedError) ?? RankFailedError(rank: rank, "\(error)")
        failed = failure
        if rank == 0 {
            for peer in peers.compactMap({ $0 }) where peer.peerRank != failure.rank { peer.sendError(rank: failure.rank ?? 0, failure.message) }
        }
        return failure
    }

    private func reduce<T: BinaryFloatingPoint>(_ values: UnsafeMutableBufferPointer<T>, _ operation: ReduceOperation) throws {
        try guardNotFailed()
        let bytes = UnsafeMutableRawBufferPointer(values)
        if rank != 0 {
            do {
                try peers[0]!.sendFrame(kind: TCPConnection.data, UnsafeRawBufferPointer(bytes))
                try peers[0]!.receiveData(into: bytes)
            } catch { failed = (error as? RankFailedError) ?? RankFailedError(rank: 0, "\(error)"); throw error }
            return
        }
        do {
            var others: [UnsafeMutableBufferPointer<T>] = []
            defer { for o in others { o.deallocate() } }
            for peer in peers.dropFirst() {
                let buffer = UnsafeMutableBufferPointer<T>.allocate(capacity: values.count)
                others.append(buffer)
                try peer!.receiveData(into: UnsafeMutableRawBufferPointer(buffer))
            }
            let result = UnsafeMutableBufferPointer<T>.allocate(capacity: values.count)
            defer { result.deallocate() }
            reduceInRankOrder([UnsafeBufferPointer(values)] + others.map { UnsafeBufferPointer($0) }, into: result, operation)
            for i in 0..<values.count { values[i] = result[i] }
            for peer in peers.dropFirst() { try peer!.sendFrame(kind: TCPConnection.data, UnsafeRawBufferPointer(bytes)) }
        } catch { throw spread(error) }
    }

    public func allReduce(_ values: UnsafeMutableBufferPointer<Float>, _ operation: ReduceOperation) throws { try reduce(values, operation) }
    public func allReduce(_ values: UnsafeMutableBufferPointer<Double>, _ operation: ReduceOperation) throws { try reduce(values, operation) }

    public func reduceScatter(_ values: UnsafeBufferPointer<Float>, into shard: UnsafeMutableBufferPointer<Float>,
                              _ operation: ReduceOperation) throws {
        try checkScatterSizes(values: values.count, shard: shard.count, worldSize: worldSize)
        try guardNotFailed()
        let part = shard.count
        if rank != 0 {
            do {
                try peers[0]!.sendFrame(kind: TCPConnection.data, UnsafeRawBufferPointer(values))
                try peers[0]!.receiveData(into: UnsafeMutableRawBufferPointer(shard))
            } catch { failed = (error as? RankFailedError) ?? RankFailedError(rank: 0, "\(error)"); throw error }
            return
        }
        do {
            var others: [UnsafeMutableBufferPointer<Float>] = []
            defer { for o in others { o.deallocate() } }
            for peer in peers.dropFirst() {
                let buffer = UnsafeMutableBufferPointer<Float>.allocate(capacity: values.count)
                others.append(buffer)
                try peer!.receiveData(into: UnsafeMutableRawBufferPointer(buffer))
            }
            let result = UnsafeMutableBufferPointer<Float>.allocate(capacity: values.count)
            defer { result.deallocate() }
            reduceInRankOrder([values] + others.map { UnsafeBufferPointer($0) }, into: result, operation)
            for i in 0..<part { shard[i] = result[i] }
            for r in 1..<worldSize {
                try peers[r]!.sendFrame(kind: TCPConnection.data, UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(result)[(r * part * 4)..<((r + 1) * part * 4)]))
            }
        } catch { throw spread(error) }
    }

    public func broadcast(_ bytes: UnsafeMutableRawBufferPointer, root: Int) throws {
        guard (0..<worldSize).contains(root) else { throw UsageError("broadcast from rank \(root) in a world of \(worldSize) ranks") }
        try guardNotFailed()
        if rank != 0 {
            do {
                if rank == root { try peers[0]!.sendFrame(kind: TCPConnection.data, UnsafeRawBufferPointer(bytes)) }
                try peers[0]!.receiveData(into: bytes)
            } catch { failed = (error as? RankFailedError) ?? RankFailedError(rank: 0, "\(error)"); throw error }
            return
        }
        do {
            if root != 0 { try peers[root]!.receiveData(into: bytes) }
            for peer in peers.dropFirst() { try peer!.sendFrame(kind: TCPConnection.data, UnsafeRawBufferPointer(bytes)) }
        } catch { throw spread(error) }
    }

    public func allGather(_ shard: UnsafeRawBufferPointer, into gathered: UnsafeMutableRawBufferPointer) throws {
        try checkGatherSizes(shard: shard.count, gathered: gathered.count, worldSize: worldSize)
        try guardNotFailed()
        let size = shard.count
        if rank != 0 {
            do {
                try peers[0]!.sendFrame(kind: TCPConnection.data, shard)
                try peers[0]!.receiveData(into: gathered)
            } catch { failed = (error as? RankFailedError) ?? RankFailedError(rank: 0, "\(error)"); throw error }
            return
        }
        do {
            if size > 0, let base = shard.baseAddress, UnsafeRawPointer(gathered.baseAddress!) != base {
                UnsafeMutableRawBufferPointer(rebasing: gathered[0..<size]).copyMemory(from: shard)
            }
            for r in 1..<worldSize {
                try peers[r]!.receiveData(into: UnsafeMutableRawBufferPointer(rebasing: gathered[(r * size)..<((r + 1) * size)]))
            }
            for peer in peers.dropFirst() { try peer!.sendFrame(kind: TCPConnection.data, UnsafeRawBufferPointer(gathered)) }
        } catch { throw spread(error) }
    }

    public func barrier() throws {
        var token: [Double] = [0]
        try allReduce(&token, .sum)
    }

    public func abort(_ message: String) {
        guard failed == nil else { return }
        failed = RankFailedError(rank: rank, message)
        for peer in peers.compactMap({ $0 }) { peer.sendError(rank: rank, message) }
    }
}
