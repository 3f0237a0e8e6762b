// Starting and watching the ranks of a job on one machine (`qlora train --gpus N`, `--world N`), and reading the
// variables an outside launcher sets (torchrun, SLURM, Kubernetes' PyTorchJob) when the same binary is one rank.
//
// The launcher starts one child per rank — this same executable, with the same arguments less its own — with
// RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, CUDA_VISIBLE_DEVICES (GPU ranks) and
// NCCL_NVLS_ENABLE=0 in its environment. It waits for all; when one exits with a failure it stops the others
// (SIGTERM, then SIGKILL after a grace period) and reports that rank's error, which the rank wrote to the file named by
// QLORA_RANK_ERROR_FILE.

#if canImport(Glibc)
import Glibc
#endif

/// Who this process is in a job started by a launcher.
public struct LaunchEnvironment: Equatable, Sendable {
    public var rank: Int
    public var worldSize: Int
    public var localRank: Int
    public var masterAddress: String
    public var masterPort: Int

    public init(rank: Int, worldSize: Int, localRank: Int, masterAddress: String, masterPort: Int) {
        self.rank = rank
        self.worldSize = worldSize
        self.localRank = localRank
        self.masterAddress = masterAddress
        self.masterPort = masterPort
    }

    /// The job this process is a rank of, from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    /// MASTER_PORT), or SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with MASTER_ADDR and MASTER_PORT); nil
    /// when neither WORLD_SIZE nor SLURM_NTASKS is set (a plain run). Malformed values are errors naming the variable.
    public static func from(_ environment: [String: String]) throws -> LaunchEnvironment? {
        func value(_ names: [String]) -> (String, String)? {
            for name in names { if let v = environment[name], !v.isEmpty { return (name, v) } }
            return nil
        }
        func integer(_ names: [String], default fallback: Int? = nil, range: ClosedRange<Int>) throws -> Int {
            guard let (name, text) = value(names) else {
                if let fallback { return fallback }
                throw UsageError("a data-parallel rank needs \(names.joined(separator: " or ")) in its environment (set by torchrun, SLURM or qlora --gpus)")
            }
            guard let v = Int(text.trimmingCharacters(in: " \t")), range.contains(v) else {
                throw UsageError("\(name)=\(text): expected an integer from \(range.lowerBound) to \(range.upperBound)")
            }
            return v
        }
        guard value(["WORLD_SIZE", "SLURM_NTASKS"]) != nil else { return nil }
        let world = try integer(["WORLD_SIZE", "SLURM_NTASKS"], range: 1...65_536)
        let rank = try integer(["RANK", "SLURM_PROCID"], range: 0...(world - 1))
        let local = try integer(["LOCAL_RANK", "SLURM_LOCALID"], default: rank, range: 0...65_535)
        let address = value(["MASTER_ADDR"])?.1 ?? (world == 1 ? "127.0.0.1" : "")
        guard !address.isEmpty else {
            throw UsageError("a data-parallel rank needs MASTER_ADDR (the host of rank 0) in its environment; under SLURM, export "
                             + "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)")
        }
        let port = try integer(["MASTER_PORT"], default: world == 1 ? 29500 : nil, range: 1...65_535)
        return LaunchEnvironment(rank: rank, worldSize: world, localRank: local, masterAddress: address, masterPort: port)
    }

    /// This process's environment as a dictionary.
    public static func processEnvironment() -> [String: String] {
        var result: [String: String] = [:]
        var entry = environ
        while let pointer = entry.pointee {
            let text = String(cString: pointer)
            if let equals = text.firstIndex(of: "=") { result[String(text[..<equals])] = String(text[text.index(after: equals)...]) }
            entry += 1
        }
        return result
    }

    /// Which GPU a rank uses, as CUDA_VISIBLE_DEVICES for this process (set before CUDA starts): the one device the
    /// launcher gave it, else the LOCAL_RANK-th of the visible devices (torchrun shows every rank all of them).
    public static func visibleDevice(localRank: Int, visible: String?) throws -> String {
        let listed = (visible ?? "").split(separator: ",").map { String($0).trimmingCharacters(in: " \t") }.filter { !$0.isEmpty }
        if listed.count == 1 { return listed[0] }
        if listed.isEmpty { return String(localRank) }
        guard localRank < listed.count else {
            throw UsageError("LOCAL_RANK=\(localRank) but CUDA_VISIBLE_DEVICES=\(visible ?? "") lists \(listed.count) GPUs: one GPU per local rank is needed")
        }
        return listed[localRank]
    }
}

/// The ranks of a job on this machine, started and watched.
public enum Launcher {
    /// One child: its rank and what its environment adds.
    public struct Rank {
        public var rank: Int
        public var environment: [String: String]
        public init(rank: Int, environment: [String: String]) {
            self.rank = rank
            self.environment = environment
        }
    }

    /// A free TCP port on this machine (for MASTER_PORT when none is given).
    public static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw UsageError("socket: \(String(cString: strerror(errno)))") }
        defer { _ = close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr = in_addr(s_addr: UInt32(0x7F00_0001).bigEndian)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard ok else { throw UsageError("cannot find a free port: \(String(cString: strerror(errno))); set MASTER_PORT") }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// The executable of this process (/proc/self/exe), which the launcher starts again once per rank.
    public static func currentExecutable() throws -> String {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard n > 0 else { throw UsageError("cannot find this program's path (/proc/self/exe): \(String(cString: strerror(errno)))") }
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Starts `executable arguments` once per rank with the common `environment` plus the rank's, waits for all, and
    /// returns when every rank exited with status 0. The first rank to fail stops the others; the error names it and
    /// carries its message. `log` reports what the launcher does.
    public static func run(executable: String, arguments: [String], environment: [String: String], ranks: [Rank],
                           gracePeriod: Double = 10, log: (String) -> Void) throws {
        let errorDirectory = try makeTemporaryDirectory()
        defer { FileSystem.removeTree(errorDirectory) }
        var children: [(rank: Int, pid: pid_t)] = []
        func stopAll(except: pid_t?) {
            for child in children where child.pid != except { kill(child.pid, SIGTERM) }
            let deadline = monotonicSeconds() + gracePeriod
            var waiting = children.filter { $0.pid != except }.map(\.pid)
            while !waiting.isEmpty {
                waiting = waiting.filter { pid in var status: Int32 = 0; return waitpid(pid, &status, WNOHANG) == 0 }
                if waiting.isEmpty { break }
                if monotonicSeconds() > deadline {
                    for pid in waiting { kill(pid, SIGKILL); var status: Int32 = 0; _ = waitpid(pid, &status, 0) }
                    break
                }
                usleep(50_000)
            }
        }
        for spec in ranks {
            var env = environment.merging(spec.environment) { _, rank in rank }
            env["QLORA_RANK_ERROR_FILE"] = errorDirectory + "/rank-\(spec.rank).error"
            do {
                children.append((spec.rank, try spawn(executable, arguments, env)))
            } catch {
                stopAll(except: nil)
                throw error
            }
        }
        log("started \(ranks.count) ranks (pids \(children.map { String($0.pid) }.joined(separator: ", ")))")
        var running = children
        while !running.isEmpty {
            var status: Int32 = 0
            let pid = waitpid(-1, &status, 0)
            if pid < 0 {
                if errno == EINTR { continue }
                break
            }
            guard let index = running.firstIndex(where: { $0.pid == pid }) else { continue }
            let child = running.remove(at: index)
            let exited = (status & 0x7f) == 0
            let code = (status >> 8) & 0xff, signal = status & 0x7f
            guard !(exited && code == 0) else { continue }
            children.removeAll { $0.pid == pid }
            stopAll(except: nil)
            // The rank whose own error started it wrote it (ranks stopped by another's failure write nothing); when
            // none did (a crash), the first rank seen to fail.
            let origin = ranks.map(\.rank).lazy.compactMap { rank -> (Int, String)? in
                let text = ((try? FileSystem.readText(errorDirectory + "/rank-\(rank).error")) ?? "").trimmingCharacters(in: " \t\n\r")
                return text.isEmpty ? nil : (rank, text)
            }.first
            let how = exited ? "exited with status \(code)" : "was killed by signal \(signal)"
            throw RankFailedError(rank: origin?.0 ?? child.rank, (origin?.1 ?? how)
                                  + (running.isEmpty ? "" : " (the other rank(s) were stopped)"))
        }
    }

    /// A new private folder for the ranks' error files.
    static func makeTemporaryDirectory() throws -> String {
        let base = getenv("TMPDIR").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        var template = Array((base + "/qlora-ranks-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw UsageError("cannot make a folder in \(base): \(String(cString: strerror(errno)))") }
        return String(cString: made)
    }

    /// posix_spawn of `executable` with `arguments` and exactly `environment`.
    static func spawn(_ executable: String, _ arguments: [String], _ environment: [String: String]) throws -> pid_t {
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.sorted { $0.key < $1.key }.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for p in argv + envp { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, executable, nil, nil, argv, envp)
        guard rc == 0 else { throw UsageError("cannot start \(executable): \(String(cString: strerror(rc)))") }
        return pid
    }

    /// Called by a rank that fails: its message for the launcher (QLORA_RANK_ERROR_FILE), best effort.
    public static func reportRankError(_ message: String) {
        guard let path = getenv("QLORA_RANK_ERROR_FILE").map({ String(cString: $0) }), !path.isEmpty else { return }
        try? FileSystem.writeAtomically(path, text: message + "\n")
    }
}
