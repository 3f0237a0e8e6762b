// cuBLASLt (libcublasLt.so), loaded with dlopen: matrix products in bf16 or fp16 (the compute dtype) with fp32
// accumulation.
//
// Row-major conventions. Our tensors are row-major; cuBLAS is column-major. A row-major [r, c] matrix with
// leading dimension c is, byte for byte, the column-major [c, r] matrix, i.e. its transpose. So the row-major
//     C[m, n] = alpha * op(A)[m, k] · op(B)[k, n] + beta * C
// is computed as the column-major product of the transposes,
//     C^T[n, m] = alpha * op(B)^T[n, k] · op(A)^T[k, m] + beta * C^T,
// by calling cuBLASLt with the operands swapped (B first), m and n swapped, and the same transpose flags:
// a row-major operand stored untransposed is exactly the column-major transpose cuBLAS needs.
// Layout sizes given to cuBLASLt are the stored (pre-op) column-major shapes:
//     B stored row-major [k, n] (transB false) -> column-major [n, k], ld n; stored [n, k] (transB true) -> [k, n], ld k
//     A stored row-major [m, k] (transA false) -> column-major [k, m], ld k; stored [k, m] (transA true) -> [m, k], ld m
// Typical uses: y = x · W^T for a linear layer with W [out, in] is gemm(transB: true); the input gradient
// dx = dy · W is gemm(); the weight gradient dW = dy^T · x is gemm(transA: true).

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// Element types cuBLASLt reads and writes here.
public enum GEMMType: Int32 {
    case float32 = 0   // CUDA_R_32F
    case bfloat16 = 14 // CUDA_R_16BF
    case float16 = 2   // CUDA_R_16F
    var bytes: Int { self == .float32 ? 4 : 2 }

    /// The 16-bit type of a compute dtype.
    public init(_ dtype: ComputeDType) { self = dtype == .bf16 ? .bfloat16 : .float16 }
}

/// A cuBLASLt handle with a workspace, bound to one device and stream.
public final class CuBLASLt {
    typealias Status = Int32
    typealias Handle = OpaquePointer?

    let library: DynamicLibrary
    public let device: CUDADevice
    /// cublasLtGetVersion (e.g. 130000 for 13.0.0).
    public let version: Int
    private var handle: OpaquePointer? = nil
    private let workspace: DeviceBuffer<UInt8>
    private var algorithmCache: [String: [UInt8]] = [:]

    let cublasLtCreate: @convention(c) (UnsafeMutablePointer<Handle>) -> Status
    let cublasLtDestroy: @convention(c) (Handle) -> Status
    let cublasLtGetVersion: @convention(c) () -> Int
    let cublasLtMatmulDescCreate: @convention(c) (UnsafeMutablePointer<Handle>, Int32, Int32) -> Status
    let cublasLtMatmulDescDestroy: @convention(c) (Handle) -> Status
    let cublasLtMatmulDescSetAttribute: @convention(c) (Handle, Int32, UnsafeRawPointer, Int) -> Status
    let cublasLtMatrixLayoutCreate: @convention(c) (UnsafeMutablePointer<Handle>, Int32, UInt64, UInt64, Int64) -> Status
    let cublasLtMatrixLayoutDestroy: @convention(c) (Handle) -> Status
    let cublasLtMatrixLayoutSetAttribute: @convention(c) (Handle, Int32, UnsafeRawPointer, Int) -> Status
    let cublasLtMatmulPreferenceCreate: @convention(c) (UnsafeMutablePointer<Handle>) -> Status
    let cublasLtMatmulPreferenceDestroy: @convention(c) (Handle) -> Status
    let cublasLtMatmulPreferenceSetAttribute: @convention(c) (Handle, Int32, UnsafeRawPointer, Int) -> Status
    let cublasLtMatmulAlgoGetHeuristic: @convention(c) (
        Handle, Handle, Handle, Handle, Handle, Handle, Handle, Int32, UnsafeMutableRawPointer, UnsafeMutablePointer<Int32>
    ) -> Status
    let cublasLtMatmul: @convention(c) (
        Handle, Handle, UnsafeRawPointer, UnsafeRawPointer?, Handle, UnsafeRawPointer?, Handle, UnsafeRawPointer,
        UnsafeRawPointer?, Handle, UnsafeMutableRawPointer?, Handle, UnsafeRawPointer?, UnsafeMutableRawPointer?, Int, Handle
    ) -> Status

    // Enum values from cublasLt.h / cublas_api.h.
    static let computeFloat32: Int32 = 68          // CUBLAS_COMPUTE_32F
    static let descTransA: Int32 = 3               // CUBLASLT_MATMUL_DESC_TRANSA
    static let descTransB: Int32 = 4               // CUBLASLT_MATMUL_DESC_TRANSB
    static let layoutBatchCount: Int32 = 5         // CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT (int32)
    static let layoutBatchStride: Int32 = 6        // CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET (int64)
    static let prefMaxWorkspace: Int32 = 1         // CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES (uint64)
    static let prefMinAlignmentA: Int32 = 5        // CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES (uint32; B, C, D follow)
    /// sizeof(cublasLtMatmulHeuristicResult_t): algo (8 x uint64), size_t workspaceSize, status, float waves, int[4].
    static let heuristicResultSize = 96

    public static let defaultLibraryNames = ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]

    /// Loads cuBLASLt and creates a handle with a `workspaceBytes` workspace (32 MiB suits Hopper).
    /// The 16-bit operand and result type of `gemm` when none is named: the context's compute dtype.
    public let storage16: GEMMType

    public init(device: CUDADevice, allocator: DeviceAllocator, workspaceBytes: Int = 32 << 20, storage16: GEMMType = .bfloat16,
                libraryNames: [String] = CuBLASLt.defaultLibraryNames) throws {
        self.storage16 = storage16
        var errors: [String] = []
        guard let library = DynamicLibrary.open(firstOf: libraryNames, errors: &errors) else {
            throw CUDAError(call: "dlopen libcublasLt",
                            "cuBLASLt (libcublasLt.so.13 or .12) not found; the CUDA backend uses it for matrix products. "
                                + "Install the CUDA toolkit's cuBLAS ('pip install nvidia-cublas' and add its lib folder to "
                                + "LD_LIBRARY_PATH, or the 'libcublas' package), or run with --device cpu. Last dlopen error: "
                                + (errors.first ?? "not found"))
        }
        self.library = library
        self.device = device
        do {
            cublasLtCreate = try library.function("cublasLtCreate")
            cublasLtDestroy = try library.function("cublasLtDestroy")
            cublasLtGetVersion = try library.function("cublasLtGetVersion")
            cublasLtMatmulDescCreate = try library.function("cublasLtMatmulDescCreate")
            cublasLtMatmulDescDestroy = try library.function("cublasLtMatmulDescDestroy")
            cublasLtMatmulDescSetAttribute = try library.function("cublasLtMatmulDescSetAttribute")
            cublasLtMatrixLayoutCreate = try library.function("cublasLtMatrixLayoutCreate")
            cublasLtMatrixLayoutDestroy = try library.function("cublasLtMatrixLayoutDestroy")
            cublasLtMatrixLayoutSetAttribute = try library.function("cublasLtMatrixLayoutSetAttribute")
            cublasLtMatmulPreferenceCreate = try library.function("cublasLtMatmulPreferenceCreate")
            cublasLtMatmulPreferenceDestroy = try library.function("cublasLtMatmulPreferenceDestroy")
            cublasLtMatmulPreferenceSetAttribute = try library.function("cublasLtMatmulPreferenceSetAttribute")
            cublasLtMatmulAlgoGetHeuristic = try library.function("cublasLtMatmulAlgoGetHeuristic")
            cublasLtMatmul = try library.function("cublasLtMatmul")
        } catch let error as MissingSymbolError {
            throw CUDAError(call: "dlsym", "\(error); cuBLASLt 12 or newer is needed")
        }
        version = cublasLtGetVersion()
        workspace = try allocator.buffer(UInt8.self, count: workspaceBytes)
        var h: OpaquePointer? = nil
        try check(cublasLtCreate(&h), "cublasLtCreate")
        handle = h
    }

    deinit { _ = cublasLtDestroy(handle) }

    static func statusName(_ status: Status) -> String {
        switch status {
        case 1: return "CUBLAS_STATUS_NOT_INITIALIZED"
        case 3: return "CUBLAS_STATUS_ALLOC_FAILED"
        case 7: return "CUBLAS_STATUS_INVALID_VALUE"
        case 8: return "CUBLAS_STATUS_ARCH_MISMATCH"
        case 11: return "CUBLAS_STATUS_MAPPING_ERROR"
        case 13: return "CUBLAS_STATUS_EXECUTION_FAILED"
        case 14: return "CUBLAS_STATUS_INTERNAL_ERROR"
        case 15: return "CUBLAS_STATUS_NOT_SUPPORTED"
        case 16: return "CUBLAS_STATUS_LICENSE_ERROR"
        default: return "cuBLAS status \(status)"
        }
    }

    private func check(_ status: Status, _ call: @autoclosure () -> String) throws {
        guard status != 0 else { return }
        throw CUDAError(call: call(), code: status, Self.statusName(status))
    }

    /// Row-major `C[m, n] = alpha * op(A)[m, k] · op(B)[k, n] + beta * C`, fp32 accumulation.
    /// A is stored [m, k] (or [k, m] when `transA`), B [k, n] (or [n, k] when `transB`), C [m, n]; densely
    /// packed, or with rows `lda`, `ldb`, `ldc` elements apart (at least the stored row length). `batch` > 1 runs that many products with the given element strides between matrices.
    /// A and B share one type; C may be 16-bit or fp32. The types default to `storage16`, the context's compute
    /// dtype. Runs on `stream` (default: the device's stream).
    public func gemm(m: Int, n: Int, k: Int,
                     a: CUdeviceptr, transA: Bool = false,
                     b: CUdeviceptr, transB: Bool = false,
                     c: CUdeviceptr,
                     inputType: GEMMType? = nil, outputType: GEMMType? = nil,
                     alpha: Float = 1, beta: Float = 0,
                     batch: Int = 1, strideA: Int = 0, strideB: Int = 0, strideC: Int = 0,
                     lda: Int? = nil, ldb: Int? = nil, ldc: Int? = nil,
                     stream: CUDAStream? = nil) throws {
        guard m > 0, n > 0, batch > 0 else { return }
        // The stored rows' lengths, and how far apart they are.
        let rowA = transA ? m : k, rowB = transB ? k : n
        let ldA = lda ?? rowA, ldB = ldb ?? rowB, ldC = ldc ?? n
        guard ldA >= rowA, ldB >= rowB, ldC >= n else {
            throw CUDAError(call: "gemm", "row strides \(ldA), \(ldB), \(ldC) shorter than the rows \(rowA), \(rowB), \(n)")
        }
        let inputType = inputType ?? storage16, outputType = outputType ?? storage16
        let s = stream ?? device.stream!
        var desc: OpaquePointer? = nil
        try check(cublasLtMatmulDescCreate(&desc, Self.computeFloat32, GEMMType.float32.rawValue), "cublasLtMatmulDescCreate")
        defer { _ = cublasLtMatmulDescDestroy(desc) }
        // Swapped operands (see the header): cuBLAS's A is our B and its B is our A.
        var opA: Int32 = transB ? 1 : 0
        var opB: Int32 = transA ? 1 : 0
        try check(cublasLtMatmulDescSetAttribute(desc, Self.descTransA, &opA, 4), "cublasLtMatmulDescSetAttribute(TRANSA)")
        try check(cublasLtMatmulDescSetAttribute(desc, Self.descTransB, &opB, 4), "cublasLtMatmulDescSetAttribute(TRANSB)")

        func layout(_ type: GEMMType, rows: Int, cols: Int, ld: Int, stride: Int) throws -> OpaquePointer? {
            var l: OpaquePointer? = nil
            try check(cublasLtMatrixLayoutCreate(&l, type.rawValue, UInt64(rows), UInt64(cols), Int64(ld)),
                      "cublasLtMatrixLayoutCreate(\(rows)x\(cols))")
            if batch > 1 {
                var count = Int32(batch)
                var offset = Int64(stride)
                try check(cublasLtMatrixLayoutSetAttribute(l, Self.layoutBatchCount, &count, 4), "cublasLtMatrixLayoutSetAttribute(BATCH_COUNT)")
                try check(cublasLtMatrixLayoutSetAttribute(l, Self.layoutBatchStride, &offset, 8), "cublasLtMatrixLayoutSetAttribute(STRIDED_BATCH_OFFSET)")
            }
            return l
        }
        let layoutA = transB ? try layout(inputType, rows: k, cols: n, ld: ldB, stride: strideB)
                             : try layout(inputType, rows: n, cols: k, ld: ldB, stride: strideB)
        defer { _ = cublasLtMatrixLayoutDestroy(layoutA) }
        let layoutB = transA ? try layout(inputType, rows: m, cols: k, ld: ldA, stride: strideA)
                             : try layout(inputType, rows: k, cols: m, ld: ldA, stride: strideA)
        defer { _ = cublasLtMatrixLayoutDestroy(layoutB) }
        let layoutC = try layout(outputType, rows: n, cols: m, ld: ldC, stride: strideC)
        defer { _ = cublasLtMatrixLayoutDestroy(layoutC) }

        // Operands inside a row (the folded LoRA's x·Aᵀ columns) are less aligned than the 256 bytes the heuristics
        // assume by default: ask for algorithms that take their alignment (cuBLAS's A is our B, its B our A).
        func alignment(_ p: CUdeviceptr) -> UInt32 { p == 0 ? 256 : UInt32(min(256, p & (~p &+ 1))) }
        let alignments = [alignment(b), alignment(a), alignment(c), alignment(c)]
        let key = "\(m),\(n),\(k),\(transA),\(transB),\(inputType),\(outputType),\(batch),\(beta != 0),\(ldA),\(ldB),\(ldC)"
            + (alignments.allSatisfy { $0 == 256 } ? "" : ",\(alignments)")
        var algo: [UInt8]
        if let cached = algorithmCache[key] {
            algo = cached
        } else {
            var pref: OpaquePointer? = nil
            try check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate")
            defer { _ = cublasLtMatmulPreferenceDestroy(pref) }
            var wsBytes = UInt64(workspace.count)
            try check(cublasLtMatmulPreferenceSetAttribute(pref, Self.prefMaxWorkspace, &wsBytes, 8),
                      "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)")
            for (i, bytes) in alignments.enumerated() where bytes < 256 {
                var value = bytes
                try check(cublasLtMatmulPreferenceSetAttribute(pref, Self.prefMinAlignmentA + Int32(i), &value, 4),
                          "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_\(["A", "B", "C", "D"][i])_BYTES = \(bytes))")
            }
            let result = UnsafeMutableRawPointer.allocate(byteCount: Self.heuristicResultSize, alignment: 16)
            defer { result.deallocate() }
            var returned: Int32 = 0
            try check(cublasLtMatmulAlgoGetHeuristic(handle, desc, layoutA, layoutB, layoutC, layoutC, pref, 1, result, &returned),
                      "cublasLtMatmulAlgoGetHeuristic(m=\(m) n=\(n) k=\(k) \(inputType)->\(outputType))")
            guard returned > 0 else {
                throw CUDAError(call: "cublasLtMatmulAlgoGetHeuristic",
                                "no algorithm for m=\(m) n=\(n) k=\(k) \(inputType)->\(outputType) transA=\(transA) transB=\(transB)")
            }
            algo = [UInt8](UnsafeRawBufferPointer(start: result, count: 64))
            algorithmCache[key] = algo
        }
        var alphaValue = alpha, betaValue = beta
        func raw(_ p: CUdeviceptr) -> UnsafeRawPointer? { UnsafeRawPointer(bitPattern: UInt(p)) }
        try algo.withUnsafeBytes { algoBytes in
            try check(cublasLtMatmul(handle, desc, &alphaValue, raw(b), layoutA, raw(a), layoutB, &betaValue,
                                     raw(c), layoutC, UnsafeMutableRawPointer(bitPattern: UInt(c)), layoutC,
                                     algoBytes.baseAddress, UnsafeMutableRawPointer(bitPattern: UInt(workspace.pointer)),
                                     workspace.count, s.handle),
                      "cublasLtMatmul(m=\(m) n=\(n) k=\(k) \(inputType)->\(outputType))")
        }
    }
}
