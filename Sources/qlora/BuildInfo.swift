// The git commit `qlora --version` reports. scripts/build_wheel.sh writes BuildInfo.generated.swift (git-ignored)
// with the commit and builds with -DQLORA_BUILD_INFO; any other build (a clean clone's `swift build`) compiles the
// fallback below and reports "unknown".

import QLoRA

#if !QLORA_BUILD_INFO
enum BuildInfo {
    static let commit = "unknown"
}
#endif

extension BuildInfo {
    /// "qlora 0.1.0 (commit 1a2b3c4d5e6f)".
    static var versionLine: String { "qlora \(QLoRAVersion.version) (commit \(commit))" }
}
