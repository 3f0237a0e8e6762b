// Run-time loading of shared libraries (the CUDA driver, NVRTC, cuBLASLt) with dlopen/dlsym.
// The package has no build-time CUDA dependency: every CUDA entry point is declared in Swift as a
// `@convention(c)` function type and bound here by name when the library is first used.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An open shared library whose symbols are looked up by name.
final class DynamicLibrary {
    /// The name that dlopen accepted (e.g. "libcuda.so.1").
    let name: String
    private let handle: UnsafeMutableRawPointer

    /// Opens the first of `candidates` that dlopen accepts; nil when none does.
    /// `errors` collects dlerror's text for each refusal (useful in the message to the user).
    static func open(firstOf candidates: [String], errors: inout [String]) -> DynamicLibrary? {
        for candidate in candidates {
            if let handle = dlopen(candidate, RTLD_NOW | RTLD_LOCAL) {
                return DynamicLibrary(name: candidate, handle: handle)
            }
            if let message = dlerror() { errors.append(String(cString: message)) }
        }
        return nil
    }

    private init(name: String, handle: UnsafeMutableRawPointer) {
        self.name = name
        self.handle = handle
    }

    /// The address of `symbol`, or nil when the library does not export it.
    func address(_ symbol: String) -> UnsafeMutableRawPointer? { dlsym(handle, symbol) }

    /// Binds `symbol` (or the first exported of several spellings, e.g. "cuMemAlloc_v2") to a Swift function type.
    func function<F>(_ symbols: String..., as type: F.Type = F.self) throws -> F {
        for symbol in symbols {
            if let pointer = dlsym(handle, symbol) { return unsafeBitCast(pointer, to: F.self) }
        }
        throw MissingSymbolError(library: name, symbols: symbols)
    }
}

/// A library that loaded but lacks an entry point we need (too old a version, most likely).
struct MissingSymbolError: Error, CustomStringConvertible {
    let library: String
    let symbols: [String]
    var description: String {
        "\(library) does not export \(symbols.joined(separator: " or ")); the installed version is probably too old"
    }
}
