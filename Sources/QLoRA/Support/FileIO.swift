// File access with POSIX calls: memory-mapped reads, atomic writes.
//
// FoundationEssentials has no mmap, and checkpoints must never be left half-written,
// so both are done here with the C library directly.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A read-only memory mapping of a whole file. The bytes stay valid while the object lives.
public final class MappedFile: @unchecked Sendable {
    public let path: String
    public let bytes: UnsafeRawBufferPointer

    public init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw FileFormatError(file: path, place: "open", "cannot open: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw FileFormatError(file: path, place: "stat", String(cString: strerror(errno))) }
        // open() succeeds on a folder and mmap() then fails with "No such device": say what it is instead.
        switch info.st_mode & S_IFMT {
        case S_IFDIR: throw FileFormatError(file: path, place: "open", "is a folder, expected a file")
        case S_IFREG: break
        default:
            // A pipe or device (/dev/stdin, a FIFO): cannot be mapped, so read it through.
            bytes = UnsafeRawBufferPointer(try Self.readStream(fd, path: path))
            isMapped = false
            return
        }
        let size = Int(info.st_size)
        if size == 0 {
            bytes = UnsafeRawBufferPointer(start: nil, count: 0)
            return
        }
        guard let base = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), base != MAP_FAILED else {
            throw FileFormatError(file: path, place: "mmap", String(cString: strerror(errno)))
        }
        bytes = UnsafeRawBufferPointer(start: base, count: size)
    }

    /// Whether `bytes` is a mapping (else an allocation holding what a stream gave).
    private var isMapped = true

    private static func readStream(_ fd: Int32, path: String) throws -> UnsafeMutableRawBufferPointer {
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n == 0 { break }
            guard n > 0 else {
                if errno == EINTR { continue }
                throw FileFormatError(file: path, place: "read", String(cString: strerror(errno)))
            }
            data += chunk[0..<n]
        }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(data.count, 1), alignment: 16)
        data.withUnsafeBytes { buffer.copyMemory(from: $0) }
        return UnsafeMutableRawBufferPointer(rebasing: buffer[0..<data.count])
    }

    deinit {
        guard let base = bytes.baseAddress else { return }
        if isMapped { munmap(UnsafeMutableRawPointer(mutating: base), bytes.count) } else { base.deallocate() }
    }
}

public enum FileSystem {
    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    public static func isDirectory(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR
    }

    public static func readFile(_ path: String) throws -> [UInt8] {
        let mapped = try MappedFile(path: path)
        return Array(mapped.bytes)
    }

    public static func readText(_ path: String) throws -> String {
        String(decoding: try readFile(path), as: UTF8.self)
    }

    /// Creates a directory and its parents; succeeds if it exists.
    public static func createDirectory(_ path: String) throws {
        var prefix = path.hasPrefix("/") ? "/" : ""
        for part in path.split(separator: "/") {
            prefix += part + "/"
            if mkdir(prefix, 0o755) != 0 && errno != EEXIST {
                throw UsageError("cannot create directory \(prefix): \(String(cString: strerror(errno)))")
            }
        }
    }

    public static func listDirectory(_ path: String) throws -> [String] {
        guard let dir = opendir(path) else { throw UsageError("cannot list \(path): \(String(cString: strerror(errno)))") }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(cString: raw.bindMemory(to: CChar.self).baseAddress!)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    public static func remove(_ path: String) { unlink(path) }

    /// Removes a file or a folder with everything in it. Symbolic links are removed, never followed.
    public static func removeTree(_ path: String) {
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        if (info.st_mode & S_IFMT) == S_IFDIR {
            for name in (try? listDirectory(path)) ?? [] { removeTree(path + "/" + name) }
            rmdir(path)
        } else {
            unlink(path)
        }
    }

    /// The absolute path with symbolic links, `.` and `..` resolved, so that `./m`, `m/` and a link to `m` compare
    /// equal. A path that does not exist yet is its deepest existing ancestor's real path plus the rest.
    public static func canonicalPath(_ path: String) -> String {
        let trimmed = path.count > 1 && path.hasSuffix("/") ? String(path.reversed().drop { $0 == "/" }.reversed()) : path
        if let resolved = realpath(trimmed.isEmpty ? "/" : trimmed, nil) {
            defer { free(resolved) }
            return String(cString: resolved)
        }
        // Not there yet: resolve the parent and append the last component.
        let slash = trimmed.lastIndex(of: "/")
        let parent = slash.map { $0 == trimmed.startIndex ? "/" : String(trimmed[..<$0]) } ?? "."
        let last = slash.map { String(trimmed[trimmed.index(after: $0)...]) } ?? trimmed
        let base = canonicalPath(parent)
        switch last {
        case ".", "": return base
        case "..": return base.lastIndex(of: "/").map { $0 == base.startIndex ? "/" : String(base[..<$0]) } ?? "/"
        default: return (base == "/" ? "" : base) + "/" + last
        }
    }

    /// Throws when writing `output` would overwrite or replace one of `inputs` (the same folder or file, or, when the
    /// output folder is replaced as a whole, a folder holding it), compared by real path. `option` names the output as
    /// the user gave it (e.g. "--out").
    public static func refuseOverwrite(output: String, option: String, inputs: [(name: String, path: String)],
                                       replacesFolder: Bool = true) throws {
        let target = canonicalPath(output)
        for input in inputs {
            let source = canonicalPath(input.path)
            if source == target {
                throw UsageError("\(option) \(output) is the \(input.name) (\(input.path)) itself: writing there would overwrite it; choose another folder")
            }
            if replacesFolder && source.hasPrefix(target == "/" ? "/" : target + "/") {
                throw UsageError("\(option) \(output) holds the \(input.name) (\(input.path)): writing there would replace it; choose another folder")
            }
        }
    }

    /// Throws unless `directory` is absent, or a folder holding only names in `replaceable` (what an earlier run of
    /// the same command wrote), so that replacing it never deletes anything else. `option` names it for the message.
    public static func checkReplaceable(_ directory: String, option: String, replaceable: Set<String>) throws {
        var info = stat()
        guard lstat(directory, &info) == 0 else { return }
        guard isDirectory(directory) else { throw UsageError("\(option) \(directory) exists and is not a folder") }
        let others = try listDirectory(directory).filter { !replaceable.contains($0) }
        guard others.isEmpty else {
            let shown = others.prefix(3).joined(separator: ", ") + (others.count > 3 ? ", ..." : "")
            throw UsageError("\(option) \(directory) already holds files this command does not write (\(shown)); "
                             + "it would be replaced as a whole, so choose a new or empty folder")
        }
    }

    /// Writes a folder beside its target (`target.tmp-<pid>`) and renames it into place once `write` has filled it
    /// and returned, so an interrupted or failed write leaves the old folder (or none), never a half-written one.
    /// An existing target is replaced only after the new folder is complete; check it with `checkReplaceable` first.
    public static func writeDirectory(_ target: String, _ write: (_ temporary: String) throws -> Void) throws {
        let target = target.count > 1 && target.hasSuffix("/") ? String(target.reversed().drop { $0 == "/" }.reversed()) : target
        let temporary = target + ".tmp-\(getpid())"
        removeTree(temporary)
        if let slash = target.lastIndex(of: "/"), slash != target.startIndex { try createDirectory(String(target[..<slash])) }
        guard mkdir(temporary, 0o755) == 0 else { throw UsageError("cannot create directory \(temporary): \(String(cString: strerror(errno)))") }
        do {
            try write(temporary)
        } catch let error as UsageError {
            removeTree(temporary)
            throw UsageError(error.message + "; \(target) is left as it was")
        } catch {
            removeTree(temporary)
            throw error
        }
        try replace(target, with: temporary)
    }

    /// Puts the complete folder `temporary` at `target`: a rename, after moving an existing target aside
    /// (`target.old-<pid>`, removed afterwards; put back if the second rename fails).
    static func replace(_ target: String, with temporary: String) throws {
        var info = stat()
        let existed = lstat(target, &info) == 0
        if existed && !isDirectory(target) {
            removeTree(temporary)
            throw UsageError("\(target) exists and is not a folder; it is left as it was")
        }
        let aside = target + ".old-\(getpid())"
        if existed {
            removeTree(aside)
            guard rename(target, aside) == 0 else {
                let reason = String(cString: strerror(errno))
                removeTree(temporary)
                throw UsageError("cannot move \(target) aside to replace it: \(reason)")
            }
        }
        guard rename(temporary, target) == 0 else {
            let reason = String(cString: strerror(errno))
            if existed { rename(aside, target) }
            removeTree(temporary)
            throw UsageError("cannot rename \(temporary) to \(target): \(reason)")
        }
        syncDirectory(containing: target)
        if existed { removeTree(aside) }
    }

    /// Writes files into the existing folder `directory` through a temporary folder inside it, then renames each
    /// file into place: every file is the old one or the new one, and nothing is replaced unless all were written.
    public static func writeFilesInto(_ directory: String, _ write: (_ temporary: String) throws -> Void) throws {
        try createDirectory(directory)
        let temporary = directory + "/.tmp-\(getpid())"
        removeTree(temporary)
        guard mkdir(temporary, 0o755) == 0 else { throw UsageError("cannot create directory \(temporary): \(String(cString: strerror(errno)))") }
        do {
            try write(temporary)
            for name in try listDirectory(temporary) {
                guard rename(temporary + "/" + name, directory + "/" + name) == 0 else {
                    throw UsageError("cannot rename \(temporary)/\(name) to \(directory)/\(name): \(String(cString: strerror(errno)))")
                }
            }
        } catch {
            removeTree(temporary)
            throw error
        }
        removeTree(temporary)
        syncDirectory(containing: directory + "/.")
    }

    /// Flushes a folder's entries (a rename is durable only once its folder is); best effort.
    static func syncDirectory(containing path: String) {
        let parent = path.lastIndex(of: "/").map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        let fd = open(parent, O_RDONLY)
        guard fd >= 0 else { return }
        fsync(fd)
        close(fd)
    }

    /// Writes a file atomically: a temporary file beside it, flushed to disk, then renamed over the target.
    /// A crash leaves either the old file or the new one, never a half-written file. Every write, the flush and
    /// the close are checked (a full disk can show at any of them), and the error names the target file.
    public static func writeAtomically(_ path: String, _ write: (AtomicFileWriter) throws -> Void) throws {
        let temporary = path + ".tmp-\(getpid())"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { throw UsageError("cannot create \(temporary): \(String(cString: strerror(errno)))") }
        let writer = AtomicFileWriter(fd: fd, path: path)
        do {
            try write(writer)
            guard fsync(fd) == 0 else {
                throw UsageError("cannot write \(path): \(String(cString: strerror(errno))) (flushing to disk; the file was not replaced)")
            }
        } catch {
            close(fd)
            unlink(temporary)
            throw error
        }
        guard close(fd) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(temporary)
            throw UsageError("cannot write \(path): \(reason) (closing; the file was not replaced)")
        }
        guard rename(temporary, path) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(temporary)
            throw UsageError("cannot rename \(temporary) to \(path): \(reason)")
        }
    }

    public static func writeAtomically(_ path: String, bytes: [UInt8]) throws {
        try writeAtomically(path) { try $0.write(bytes) }
    }

    public static func writeAtomically(_ path: String, text: String) throws {
        try writeAtomically(path, bytes: Array(text.utf8))
    }
}

/// The open temporary file inside `FileSystem.writeAtomically`.
public final class AtomicFileWriter {
    let fd: Int32
    /// The target file, named in errors.
    let path: String
    init(fd: Int32, path: String) { self.fd = fd; self.path = path }

    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        var offset = 0
        while offset < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
            guard n > 0 else {
                if n < 0 && errno == EINTR { continue }
                let reason = n == 0 ? "the write made no progress" : String(cString: strerror(errno))
                throw UsageError("cannot write \(path): \(reason) (the file was not replaced)")
            }
            offset += n
        }
    }

    public func write(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write($0) }
    }
}
