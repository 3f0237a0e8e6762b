// swift-tools-version:6.0
import PackageDescription

// Release builds trade bounds checks for speed in the numeric hot loops; debug builds keep every check.
let fastMath: [SwiftSetting] = [
    .unsafeFlags(["-Ounchecked", "-wmo"], .when(configuration: .release)),
    // Haswell-level x86-64 (AVX2 + FMA): without it SIMD fused multiply-adds become library calls.
    .unsafeFlags(["-target-cpu", "haswell"]),
]

let package = Package(
    name: "swift-qlora",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "QLoRA", targets: ["QLoRA"]),
        .executable(name: "qlora", targets: ["qlora"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .target(
            name: "QLoRA",
            swiftSettings: fastMath
        ),
        .executableTarget(
            name: "qlora",
            dependencies: [
                "QLoRA",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: fastMath
        ),
        .testTarget(
            name: "QLoRATests",
            dependencies: ["QLoRA"],
            path: "Tests/QLoRATests"
        ),
    ],
    swiftLanguageModes: [.v5]
)
