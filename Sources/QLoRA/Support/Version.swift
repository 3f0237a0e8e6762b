// The version of swift-qlora: `qlora --version` prints it, and scripts/build_wheel.sh reads it from this line
// (keep it a plain string literal) to name the wheel.

public enum QLoRAVersion {
    public static let version = "0.1.0"
}
