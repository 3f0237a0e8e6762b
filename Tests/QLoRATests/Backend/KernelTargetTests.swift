import XCTest
@testable import QLoRA

/// The kernel target: what `QLORA_KERNEL_ARCH` and `qlora-gpu-check --arch` accept, what NVRTC is asked for, and
/// the shared-memory limit that decides between the flash and the 64-row attention kernels.
final class KernelTargetTests: XCTestCase {
    func testParsesCubinAndPTXTargets() throws {
        let hopper = try KernelTarget(parsing: "sm_90a")
        XCTAssertEqual(hopper, KernelTarget(major: 9, minor: 0, isVirtual: false))
        XCTAssertEqual(hopper.nvrtcArchitecture, "sm_90a")
        let ada = try KernelTarget(parsing: "SM_89")
        XCTAssertEqual(ada.nvrtcArchitecture, "sm_89")
        let ampere = try KernelTarget(parsing: "compute_86")
        XCTAssertTrue(ampere.isVirtual)
        XCTAssertEqual(ampere.nvrtcArchitecture, "compute_86")
        XCTAssertEqual(KernelCompiler.options(for: ampere).first, "-arch=compute_86")
        XCTAssertEqual(try KernelTarget(parsing: "sm_100").major, 10)
    }

    func testRejectsWhatIsNotAnArchitecture() {
        for text in ["", "86", "sm_", "sm_x6", "gfx90a", "compute_70", "sm_61"] {
            XCTAssertThrowsError(try KernelTarget(parsing: text), text) { error in
                XCTAssertTrue("\(error)".contains("kernel architecture"), "\(error)")
            }
        }
    }

    func testConsumerCardsGetTheirOwnSharedMemoryLimit() throws {
        // The flash backward for head dimension 128 needs 155.5 KB: an A100 (163 KB) and an H100 (227 KB) hold it,
        // an RTX 3090/4090 or L4 (99 KB) does not.
        let flashBackward128 = (2 * 128 + 4 * 64) * (128 + 8) * 2 + 128 * 72 * 2 + 3 * 2 * 64 * 4
        XCTAssertEqual(flashBackward128, 159_232)
        XCTAssertGreaterThanOrEqual(try KernelTarget(parsing: "sm_80").maxSharedMemoryPerBlock, flashBackward128)
        XCTAssertGreaterThanOrEqual(try KernelTarget(parsing: "sm_90a").maxSharedMemoryPerBlock, flashBackward128)
        XCTAssertLessThan(try KernelTarget(parsing: "compute_86").maxSharedMemoryPerBlock, flashBackward128)
        XCTAssertLessThan(try KernelTarget(parsing: "sm_89").maxSharedMemoryPerBlock, flashBackward128)
        XCTAssertEqual(try KernelTarget(parsing: "sm_75").maxSharedMemoryPerBlock, 64 * 1024)
    }

    func testAttentionKernelChoice() throws {
        // QLORA_ATTENTION=mma|wgmma-forward|wgmma|wgmma-pipelined picks the Hopper d128 flash kernels (mma: neither on
        // wgmma, wgmma-forward: the forward, wgmma: both, wgmma-pipelined: both pipelined); anything else is a usage
        // error naming it.
        XCTAssertEqual(try AttentionKernel(parsing: "wgmma"), .wgmma)
        XCTAssertEqual(try AttentionKernel(parsing: "WGMMA-forward"), .wgmmaForward)
        XCTAssertEqual(try AttentionKernel(parsing: "MMA"), .mma)
        XCTAssertEqual(try AttentionKernel(parsing: "wgmma-pipelined"), .wgmmaPipelined)
        XCTAssertEqual(AttentionKernel.allCases.map { [$0.forwardOnWGMMA, $0.backwardOnWGMMA, $0.forwardPipelined, $0.backwardPipelined] },
                       [[false, false, false, false], [true, false, false, false], [true, true, false, false], [true, true, true, true]])
        XCTAssertThrowsError(try AttentionKernel(parsing: "fa3")) { error in
            XCTAssertTrue(error is UsageError)
            XCTAssertTrue("\(error)".contains("QLORA_ATTENTION=fa3"), "\(error)")
        }
        setenv("QLORA_ATTENTION", "mma", 1)
        defer { unsetenv("QLORA_ATTENTION") }
        XCTAssertEqual(try AttentionKernel.fromEnvironment(), .mma)
        setenv("QLORA_ATTENTION", "", 1)
        XCTAssertEqual(try AttentionKernel.fromEnvironment(), .wgmmaPipelined, "the pipelined wgmma forward and backward where they apply are the default")
        setenv("QLORA_ATTENTION", "wgmma", 1)
        XCTAssertEqual(try AttentionKernel.fromEnvironment(), .wgmma)
        setenv("QLORA_ATTENTION", "flash3", 1)
        XCTAssertThrowsError(try AttentionKernel.fromEnvironment())
        // The launcher's shared memory is the kernel's WG_SHARED (the same expression) and fits Hopper's 227 KB.
        XCTAssertTrue(KernelSources.attentionWGMMA.text.contains("#define WG_SHARED (5 * WG_TILE_BYTES + 2 * WG_KEYS * 4 + 1024)"))
        XCTAssertTrue(KernelSources.attentionWGMMA.text.contains("#define WG_TILE_BYTES (128 * 128 * 2)"))
        XCTAssertEqual(CUDAContext.wgmmaForwardShared, 5 * (128 * 128 * 2) + 2 * 128 * 4 + 1024)
        XCTAssertLessThanOrEqual(CUDAContext.wgmmaForwardShared, try KernelTarget(parsing: "sm_90a").maxSharedMemoryPerBlock)
        // The same for the backward's WGB_SHARED.
        XCTAssertTrue(KernelSources.attentionWGMMA.text.contains(
            "#define WGB_SHARED (2 * WG_TILE_BYTES + 4 * WGB_QTILE_BYTES + WGB_DS_BYTES + 3 * 2 * WGB_QUERIES * 4 + 1024)"))
        XCTAssertTrue(KernelSources.attentionWGMMA.text.contains("#define WGB_QTILE_BYTES (WGB_QUERIES * 128 * 2)"))
        XCTAssertTrue(KernelSources.attentionWGMMA.text.contains("#define WGB_DS_BYTES (128 * WGB_QUERIES * 2)"))
        XCTAssertTrue(KernelSources.attentionWGMMA.text.contains("#define WGB_QUERIES 64 "))
        XCTAssertEqual(CUDAContext.wgmmaBackwardShared, 150_016)
        XCTAssertLessThanOrEqual(CUDAContext.wgmmaBackwardShared, try KernelTarget(parsing: "sm_90a").maxSharedMemoryPerBlock)
        // And the pipelined backward's WGBP_SHARED: two stages of 64 dQ rows of 544 bytes beside WGB_SHARED.
        XCTAssertTrue(KernelSources.attentionWGMMA.text.contains("#define WGBP_SHARED (WGB_SHARED + 2 * WGBP_DQ_BYTES)"))
        XCTAssertTrue(KernelSources.attentionWGMMA.text.contains("#define WGBP_DQ_BYTES (WGB_QUERIES * WGBP_DQ_STRIDE)"))
        XCTAssertTrue(KernelSources.attentionWGMMA.text.contains("#define WGBP_DQ_STRIDE 544 "))
        XCTAssertEqual(CUDAContext.wgmmaBackwardPipelinedShared, CUDAContext.wgmmaBackwardShared + 2 * 64 * 544)
        // And the pipelined forward's WGF_PIPELINED_SHARED: a third stage of V.
        XCTAssertTrue(KernelSources.attentionWGMMA.text.contains("#define WGF_PIPELINED_SHARED (6 * WG_TILE_BYTES + 2 * WG_KEYS * 4 + 1024)"))
        XCTAssertEqual(CUDAContext.wgmmaForwardPipelinedShared, 198_656)
        XCTAssertLessThanOrEqual(CUDAContext.wgmmaForwardPipelinedShared, try KernelTarget(parsing: "sm_90a").maxSharedMemoryPerBlock)
        XCTAssertLessThanOrEqual(CUDAContext.wgmmaBackwardPipelinedShared, try KernelTarget(parsing: "sm_90a").maxSharedMemoryPerBlock)
    }
}
