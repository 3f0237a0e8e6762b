import XCTest
import Foundation
@testable import QLoRA

/// The CUDA backend must build and load everywhere, and say clearly what is missing where CUDA is not installed.
final class CUDAAvailabilityTests: XCTestCase {
    func testMissingDriverSaysWhatToInstall() {
        XCTAssertThrowsError(try CUDADriver(libraryNames: ["libcuda-not-installed.so.1"])) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains("no CUDA driver found"), text)
            XCTAssertTrue(text.contains("libcuda.so.1"), text)
            XCTAssertTrue(text.contains("--device cpu"), text)
        }
    }

    func testMissingNVRTCAndCuBLASLtSayWhatToInstall() {
        XCTAssertThrowsError(try NVRTC(libraryNames: ["libnvrtc-not-installed.so"])) { error in
            XCTAssertTrue("\(error)".contains("NVRTC (libnvrtc.so, CUDA 12 or 13) not found"), "\(error)")
        }
    }

    func testContextOnThisMachineEitherOpensOrExplains() {
        // On a machine without the NVIDIA driver (CI, this build machine) opening a context must fail with the
        // driver message; where a GPU is present it opens.
        do {
            let context = try CUDAContext()
            XCTAssertGreaterThan(context.device.multiprocessorCount, 0)
        } catch let error as CUDAError {
            XCTAssertFalse(error.message.isEmpty)
            if dlopenFails("libcuda.so.1") { XCTAssertTrue(error.message.contains("no CUDA driver found"), "\(error)") }
        } catch {
            XCTFail("unexpected error type: \(error)")
        }
    }

    private func dlopenFails(_ name: String) -> Bool {
        var errors: [String] = []
        return DynamicLibrary.open(firstOf: [name], errors: &errors) == nil
    }

    func testSizeClassesRoundUpWithBoundedWaste() {
        XCTAssertEqual(DeviceAllocator.sizeClass(1), 512)
        XCTAssertEqual(DeviceAllocator.sizeClass(512), 512)
        XCTAssertEqual(DeviceAllocator.sizeClass(513), 1024)
        XCTAssertEqual(DeviceAllocator.sizeClass(1 << 20), 1 << 20)
        XCTAssertEqual(DeviceAllocator.sizeClass((1 << 20) + 1), 2 << 20)
        for bytes in [3 << 20, 100_000_000, 1_500_000_000] {
            let size = DeviceAllocator.sizeClass(bytes)
            XCTAssertGreaterThanOrEqual(size, bytes)
            XCTAssertLessThanOrEqual(Double(size), Double(bytes) * 1.125 + Double(2 << 20))
        }
    }

    func testKernelCacheKeyIsStableAndSensitive() {
        let a = StableHash.hex128(Array("kernel source".utf8))
        XCTAssertEqual(a, StableHash.hex128(Array("kernel source".utf8)))
        XCTAssertNotEqual(a, StableHash.hex128(Array("kernel sourcf".utf8)))
        XCTAssertEqual(a.count, 32)
    }

    func testEveryKernelFileIsEmbedded() {
        // Every .cu file of the Kernels folder is in KernelSources.all.
        let kernels = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../../Sources/QLoRA/Backend/CUDA/Kernels")
        let files = ((try? FileManager.default.contentsOfDirectory(atPath: kernels.path)) ?? []).filter { $0.hasSuffix(".cu") }
        XCTAssertGreaterThanOrEqual(files.count, 11)
        XCTAssertEqual(Set(KernelSources.all.map(\.name)), Set(files))
        for source in KernelSources.all {
            XCTAssertTrue(source.text.contains("extern \"C\" __global__"), source.name)
            XCTAssertTrue(source.text.contains("#include \"qlora_prelude.cuh\""), source.name)
        }
        XCTAssertTrue(KernelSources.headers[0].text.contains("float_to_bf16"))
    }

    func testEveryLaunchedKernelExists() throws {
        // A kernel name a launcher asks for that its file lacks fails only on a GPU; catch it here. Static names:
        // every `KernelSources.<file>, "<kernel>"` in the CUDA backend's Swift files; dynamic ones listed below.
        let backend = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../../Sources/QLoRA/Backend/CUDA")
        /// The file of `KernelSources.<property>`: snake case (crossEntropy → cross_entropy.cu, attentionMMA → attention_mma.cu).
        func source(_ property: String) -> KernelSource? {
            var name = ""
            var previous: Character?
            for c in property {
                if c.isUppercase, let p = previous, p.isLowercase || p.isNumber { name += "_" }
                name += c.lowercased()
                previous = c
            }
            return KernelSources.all.first { $0.name == name + ".cu" }
        }
        // `extern "C" __global__ void [__launch_bounds__(...)] name(`, the name possibly on the next line.
        let definition = try NSRegularExpression(pattern: #"extern "C" __global__ void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\("#)
        func defines(_ source: KernelSource, _ kernel: String) -> Bool {
            let text = source.text
            return definition.matches(in: text, range: NSRange(text.startIndex..., in: text)).contains {
                String(text[Range($0.range(at: 1), in: text)!]) == kernel
            }
        }
        // Only whole names (`function(KernelSources.x, "name")`), not prefixes a launcher completes at run time.
        let pattern = try NSRegularExpression(pattern: #"KernelSources\.(\w+), "(\w+)"\)"#)
        var found = 0
        let walker = FileManager.default.enumerator(atPath: backend.path)
        while let path = walker?.nextObject() as? String {
            guard path.hasSuffix(".swift") else { continue }
            let text = try String(contentsOfFile: backend.appendingPathComponent(path).path, encoding: .utf8)
            for match in pattern.matches(in: text, range: NSRange(text.startIndex..., in: text)) {
                let property = String(text[Range(match.range(at: 1), in: text)!]), kernel = String(text[Range(match.range(at: 2), in: text)!])
                guard let file = source(property) else { XCTFail("\(path): KernelSources.\(property) is not a kernel file"); continue }
                XCTAssertTrue(defines(file, kernel), "\(path) launches \(kernel), which \(file.name) does not define")
                found += 1
            }
        }
        XCTAssertGreaterThan(found, 30)
        // Names made at run time: the gated activations and the soft-cap.
        for activation in [MLPActivation.silu, .geluTanh] {
            for direction in ["forward", "backward"] {
                XCTAssertTrue(defines(KernelSources.swiglu, CUDAContext.gatedKernel(activation, direction)))
            }
        }
        for kernel in ["softcap_f32", "softcap_h16"] { XCTAssertTrue(defines(KernelSources.crossEntropy, kernel), kernel) }
    }

    func testKernelCacheStoresAtomicallyAndLoads() throws {
        let dir = try TestFixtures.temporaryDirectory() + "/nested/kernels"
        let cache = KernelCache(directory: dir)
        XCTAssertNil(cache.load(key: "nf4-0123"))
        try cache.store(key: "nf4-0123", cubin: [1, 2, 3, 4])
        XCTAssertEqual(cache.load(key: "nf4-0123"), [1, 2, 3, 4])
        try cache.store(key: "nf4-0123", cubin: [9])
        XCTAssertEqual(cache.load(key: "nf4-0123"), [9])
        XCTAssertEqual(try FileSystem.listDirectory(dir), ["nf4-0123.cubin"])  // no temporary files left behind
    }
}
