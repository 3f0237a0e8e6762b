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
