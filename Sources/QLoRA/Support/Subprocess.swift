// Running a helper program (pip, python) and waiting for it. FoundationEssentials has no Process,
// so this uses posix_spawnp and waitpid directly.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public enum Subprocess {
    /// Runs `arguments[0]` (looked up in PATH) with the arguments and waits for it to finish.
    /// Its standard output goes to our standard error (so that a command's own output stays clean); standard
    /// error is inherited. Returns the exit status; a program killed by a signal gives 128 + the signal.
    @discardableResult
    public static func run(_ arguments: [String]) throws -> Int32 {
        precondition(!arguments.isEmpty)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, 2, 1)

        let argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawnp(&pid, arguments[0], &actions, nil, argv, environ)
        guard rc == 0 else {
            throw UsageError("cannot run \(arguments[0]): \(String(cString: strerror(rc)))")
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            guard errno == EINTR else { throw UsageError("waiting for \(arguments[0]) failed: \(String(cString: strerror(errno)))") }
        }
        // The W* macros are not visible to Swift: low 7 bits = terminating signal, bits 8-15 = exit code.
        let signal = status & 0x7F
        return signal == 0 ? (status >> 8) & 0xFF : 128 + signal
    }

    /// The value of an environment variable.
    public static func environment(_ name: String) -> String? {
        getenv(name).map { String(cString: $0) }
    }
}
