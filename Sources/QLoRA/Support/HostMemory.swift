#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The machine's own memory, which pinned host buffers (offloaded checkpoints, kept attention outputs) come from.
public enum HostMemory {
    /// Physical RAM in bytes, nil where the system does not say.
    public static var physicalBytes: Int? {
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), size = sysconf(Int32(_SC_PAGESIZE))
        return pages > 0 && size > 0 ? pages * size : nil
    }

    /// How much of `physical` bytes of RAM the trainer lets pinned copies take (three quarters: the rest for the
    /// process's own pageable memory and the system). The trainer and `qlora plan` share this rule.
    public static func pinnableBytes(ofPhysical physical: Int) -> Int { physical / 4 * 3 }
}
