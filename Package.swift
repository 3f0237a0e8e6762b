// swift-tools-version:6.0
import PackageDescription

// Release builds keep Swift's bounds and overflow checks (plain -O): every file we read may come from the
// internet, so a missed validation must trap, never read out of bounds. The measured numeric hot loops
// opt out locally with unsafe buffer pointers and wrapping arithmetic (docs/RELIABILITY.md has the cost).
let fastMath: [SwiftSetting] = [
    .unsafeFlags(["-O", "-wmo"], .when(configuration: .release)),
    // Haswell-level x86-64 (AVX2 + FMA): without it SIMD fused multiply-adds become library calls.
    .unsafeFlags(["-target-cpu", "haswell"]),
]

let package = Package(
    name: "swift-qlora",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "QLoRA", targets: ["QLoRA"]),
        .executable(name: "qlora", targets: ["qlora"]),
        .executable(name: "qlora-gpu-check", targets: ["qlora-gpu-check"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .target(
            name: "QLoRA",
            exclude: ["Backend/CUDA/README.md"],
            // CUDA kernels travel inside the binary as bytes (PackageResources.<file>_cu); NVRTC compiles them at run time.
            resources: [
                .embedInCode("Backend/CUDA/Kernels/qlora_prelude.cuh"),
                .embedInCode("Backend/CUDA/Kernels/attention_common.cuh"),
                .embedInCode("Backend/CUDA/Kernels/nf4.cu"),
                .embedInCode("Backend/CUDA/Kernels/rmsnorm.cu"),
                .embedInCode("Backend/CUDA/Kernels/rope.cu"),
                .embedInCode("Backend/CUDA/Kernels/swiglu.cu"),
                .embedInCode("Backend/CUDA/Kernels/embedding.cu"),
                .embedInCode("Backend/CUDA/Kernels/cross_entropy.cu"),
                .embedInCode("Backend/CUDA/Kernels/adamw.cu"),
                .embedInCode("Backend/CUDA/Kernels/attention.cu"),
                .embedInCode("Backend/CUDA/Kernels/attention_mma.cu"),
                .embedInCode("Backend/CUDA/Kernels/attention_wgmma.cu"),
                .embedInCode("Backend/CUDA/Kernels/convert.cu"),
                .embedInCode("Backend/CUDA/Kernels/decode.cu"),
                .embedInCode("Backend/CUDA/Kernels/decode_batched.cu"),
                .embedInCode("Backend/CUDA/Kernels/random.cu"),
                .embedInCode("Backend/CUDA/Kernels/adamw8bit.cu"),
                .embedInCode("Backend/CUDA/Kernels/training.cu"),
                .embedInCode("Backend/CUDA/Kernels/lora_dropout.cu"),
            ],
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
        .executableTarget(
            name: "qlora-gpu-check",
            dependencies: ["QLoRA"],
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
