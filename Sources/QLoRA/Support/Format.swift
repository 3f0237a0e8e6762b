// printf-style number formatting. FoundationEssentials has no String(format:), so this goes
// through the C library's vsnprintf. Numbers only: pass strings by interpolation, not %s.

#if canImport(Glibc)
import Glibc
#endif

extension String {
    /// `String(cFormat: "%.4f", x)`, as C's printf formats it.
    public init(cFormat format: String, _ arguments: CVarArg...) {
        self = withVaList(arguments) { list in
            var buffer = [CChar](repeating: 0, count: 1024)
            let written = vsnprintf(&buffer, buffer.count, format, list)
            if written >= buffer.count {
                buffer = [CChar](repeating: 0, count: Int(written) + 1)
                _ = withVaList(arguments) { vsnprintf(&buffer, buffer.count, format, $0) }
            }
            return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }
}
