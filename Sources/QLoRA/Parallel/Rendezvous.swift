// Where the ranks of a job meet: rank 0 listens at MASTER_ADDR:MASTER_PORT, every other rank connects (retrying until
// a timeout) and says who it is; rank 0 checks that the ranks agree on the world size and that each rank comes once,
// then sends every rank the job's payload (NCCL's 128-byte unique id on GPUs; nothing on CPU ranks). The connections
// stay open: on the CPU they carry the collective itself (`SocketCollective`, a star around rank 0).
//
// The wire, all integers little-endian:
//   hello (rank → 0):  "QLDP" · version u32 (1) · rank u32 · world size u32
//   frame (both ways): kind u8 ('D' data, 'E' error) · length u64 · payload
//   an 'E' payload:    failing rank u32 · UTF-8 message

#if canImport(Glibc)
import Glibc
#endif

/// One TCP connection, with whole-buffer sends and receives that name the peer in their errors.
public final class TCPConnection {
    let fd: Int32
    /// "rank 2" or "rank 0 at 10.0.0.1:29500", for messages.
    let peer: String
    let peerRank: Int?

    init(fd: Int32, peer: String, peerRank: Int?) {
        self.fd = fd
        self.peer = peer
        self.peerRank = peerRank
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit { close() }

    private var closed = false
    func close() {
        guard !closed else { return }
        closed = true
        _ = Glibc.close(fd)
    }

    func send(_ bytes: UnsafeRawBufferPointer) throws {
        var sent = 0
        while sent < bytes.count {
            let n = Glibc.send(fd, bytes.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                throw RankFailedError(rank: peerRank, "the connection to \(peer) broke (\(String(cString: strerror(errno)))): it stopped or failed")
            }
            sent += n
        }
    }

    func send(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try send($0) } }

    func receive(into bytes: UnsafeMutableRawBufferPointer) throws {
        var got = 0
        while got < bytes.count {
            let n = recv(fd, bytes.baseAddress! + got, bytes.count - got, 0)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                let why = n == 0 ? "closed the connection" : "broke the connection (\(String(cString: strerror(errno))))"
                throw RankFailedError(rank: peerRank, "\(peer) \(why): that process ended or was stopped")
            }
            got += n
        }
    }

    func receive(_ count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { try receive(into: $0) }
        return bytes
    }

    // MARK: Frames

    static let data: UInt8 = 0x44, error: UInt8 = 0x45

    func sendFrame(kind: UInt8, _ payload: UnsafeRawBufferPointer) throws {
        var header = [UInt8](repeating: 0, count: 9)
        header[0] = kind
        Wire.put(UInt64(payload.count), into: &header, at: 1)
        try send(header)
        try send(payload)
    }

    /// Receives one data frame of exactly `count` bytes into `bytes`; an error frame throws the failing rank's error.
    func receiveData(into bytes: UnsafeMutableRawBufferPointer) throws {
        let header = try receive(9)
        let length = Int(Wire.get(UInt64.self, header, at: 1))
        if header[0] == Self.error {
            guard length >= 4, length < 1 << 20 else { throw RankFailedError(rank: peerRank, "\(peer) failed") }
            let payload = try receive(length)
            throw RankFailedError(rank: Int(Wire.get(UInt32.self, payload, at: 0)), String(decoding: payload[4...], as: UTF8.self))
        }
        guard header[0] == Self.data, length == bytes.count else {
            throw UsageError("\(peer) sent \(length) bytes where \(bytes.count) were expected: the ranks run different configurations "
                             + "(every rank must run the same command)")
        }
        try receive(into: bytes)
    }

    func sendError(rank: Int, _ message: String) {
        var payload = [UInt8](repeating: 0, count: 4)
        Wire.put(UInt32(rank), into: &payload, at: 0)
        payload += Array(message.utf8.prefix(60_000))
        try? payload.withUnsafeBytes { try sendFrame(kind: Self.error, $0) }
    }
}

/// Little-endian integers in byte arrays.
enum Wire {
    static func put<T: FixedWidthInteger>(_ value: T, into bytes: inout [UInt8], at offset: Int) {
        for i in 0..<MemoryLayout<T>.size { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
    }
    static func get<T: FixedWidthInteger>(_ type: T.Type, _ bytes: [UInt8], at offset: Int) -> T {
        var value: T = 0
        for i in 0..<MemoryLayout<T>.size { value |= T(bytes[offset + i]) << (8 * i) }
        return value
    }
}

/// The meeting of the ranks at MASTER_ADDR:MASTER_PORT.
public enum Rendezvous {
    static let magic: [UInt8] = Array("QLDP".utf8)
    static let version: UInt32 = 1

    /// Seconds to wait for the other ranks: QLORA_RENDEZVOUS_TIMEOUT, else 600.
    public static func defaultTimeout() throws -> Double {
        guard let text = getenv("QLORA_RENDEZVOUS_TIMEOUT").map({ String(cString: $0) }), !text.isEmpty else { return 600 }
        guard let value = Double(text), value > 0, value.isFinite else {
            throw UsageError("QLORA_RENDEZVOUS_TIMEOUT=\(text): expected a positive number of seconds")
        }
        return value
    }

    /// Rank 0: listens on `port` (every interface), accepts the other `worldSize − 1` ranks within `timeout` seconds,
    /// sends each `payload`. Returns the connections by rank (index 0 is nil).
    public static func serve(port: Int, worldSize: Int, payload: [UInt8], timeout: Double) throws -> [TCPConnection?] {
        var connections = [TCPConnection?](repeating: nil, count: worldSize)
        guard worldSize > 1 else { return connections }
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard listener >= 0 else { throw UsageError("rendezvous: socket: \(String(cString: strerror(errno)))") }
        defer { _ = close(listener) }
        var one: Int32 = 1
        _ = setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr = in_addr(s_addr: INADDR_ANY)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0 else {
            throw UsageError("rendezvous: rank 0 cannot listen on port \(port) (MASTER_PORT): \(String(cString: strerror(errno))); "
                             + "choose a free port")
        }
        guard listen(listener, Int32(worldSize)) == 0 else { throw UsageError("rendezvous: listen: \(String(cString: strerror(errno)))") }
        let deadline = monotonicSeconds() + timeout
        while connections.dropFirst().contains(where: { $0 == nil }) {
            let left = deadline - monotonicSeconds()
            var poller = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            let ready = left > 0 ? poll(&poller, 1, Int32(min(left, 1) * 1000)) : 0
            if ready < 0 && errno == EINTR { continue }
            if ready <= 0 {
                guard left > 0 else {
                    let missing = (1..<worldSize).filter { connections[$0] == nil }.map(String.init).joined(separator: ", ")
                    throw UsageError("rendezvous: rank 0 waited \(Int(timeout)) s on port \(port) for rank(s) \(missing) of \(worldSize); "
                                     + "did they start, with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE? (QLORA_RENDEZVOUS_TIMEOUT sets the wait)")
                }
                continue
            }
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { continue }
            let connection = TCPConnection(fd: fd, peer: "a connecting rank", peerRank: nil)
            // A stranger that connects and says nothing must not hold the job: its hello has a deadline too.
            var wait = timeval(tv_sec: 30, tv_usec: 0)
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &wait, socklen_t(MemoryLayout<timeval>.size))
            guard let hello = try? connection.receive(16), Array(hello[0..<4]) == magic else { continue }
            let rank = Int(Wire.get(UInt32.self, hello, at: 8)), world = Int(Wire.get(UInt32.self, hello, at: 12))
            guard Wire.get(UInt32.self, hello, at: 4) == version else {
                throw UsageError("rendezvous: rank \(rank) runs another version of qlora's rendezvous; run the same qlora on every rank")
            }
            guard world == worldSize else {
                throw UsageError("rendezvous: rank \(rank) says the world has \(world) ranks; rank 0 was started with WORLD_SIZE=\(worldSize)")
            }
            guard (1..<worldSize).contains(rank), connections[rank] == nil else {
                throw UsageError("rendezvous: rank \(rank) joined \(rank == 0 ? "as rank 0, which is this process" : "twice"); every rank needs its own RANK")
            }
            var forever = timeval(tv_sec: 0, tv_usec: 0)
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &forever, socklen_t(MemoryLayout<timeval>.size))
            connections[rank] = TCPConnection(fd: dup(fd), peer: "rank \(rank)", peerRank: rank)
            connection.close()
        }
        for connection in connections.compactMap({ $0 }) {
            try payload.withUnsafeBytes { try connection.sendFrame(kind: TCPConnection.data, $0) }
        }
        return connections
    }

    /// A rank other than 0: connects to `host:port` (retrying until `timeout` seconds), says its rank and world size,
    /// and receives the payload of `payloadBytes` bytes. Returns the connection to rank 0 and the payload.
    public static func join(host: String, port: Int, rank: Int, worldSize: Int, payloadBytes: Int,
                            timeout: Double) throws -> (TCPConnection, [UInt8]) {
        let deadline = monotonicSeconds() + timeout
        var lastError = ""
        while true {
            if let fd = try connect(host: host, port: port, error: &lastError) {
                let connection = TCPConnection(fd: fd, peer: "rank 0 at \(host):\(port)", peerRank: 0)
                var hello = magic + [UInt8](repeating: 0, count: 12)
                Wire.put(version, into: &hello, at: 4)
                Wire.put(UInt32(rank), into: &hello, at: 8)
                Wire.put(UInt32(worldSize), into: &hello, at: 12)
                try connection.send(hello)
                var payload = [UInt8](repeating: 0, count: payloadBytes)
                try payload.withUnsafeMutableBytes { try connection.receiveData(into: $0) }
                return (connection, payload)
            }
            guard monotonicSeconds() < deadline else {
                throw UsageError("rendezvous: rank \(rank) could not reach rank 0 at \(host):\(port) (MASTER_ADDR:MASTER_PORT) within "
                                 + "\(Int(timeout)) s: \(lastError); is rank 0 running? (QLORA_RENDEZVOUS_TIMEOUT sets the wait)")
            }
            usleep(200_000)
        }
    }

    /// A connected socket, or nil (with the reason in `error`) when the host refuses or cannot be reached yet.
    static func connect(host: String, port: Int, error: inout String) throws -> Int32? {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let first = list else {
            error = "cannot resolve \(host): \(String(cString: gai_strerror(rc)))"
            return nil
        }
        defer { freeaddrinfo(list) }
        var entry: UnsafeMutablePointer<addrinfo>? = first
        while let info = entry {
            let fd = socket(info.pointee.ai_family, info.pointee.ai_socktype, info.pointee.ai_protocol)
            if fd >= 0 {
                if Glibc.connect(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) == 0 { return fd }
                error = String(cString: strerror(errno))
                _ = close(fd)
            }
            entry = info.pointee.ai_next
        }
        return nil
    }
}
