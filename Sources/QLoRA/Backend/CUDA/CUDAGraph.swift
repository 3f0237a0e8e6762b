// CUDA graphs: a stream's launches recorded once (stream capture) and replayed with one call. Batch-1 decode runs
// some 400 small kernels per token; replaying them as a graph removes the per-launch host cost.
// Kernels in a graph see the same arguments at every replay, so whatever changes per step (the position, the
// token) is read from device memory that the host updates before each replay.

/// The graph entry points of the driver, bound on first use.
final class CUDAGraphAPI {
    typealias Result = Int32
    let cuStreamBeginCapture: @convention(c) (OpaquePointer?, Int32) -> Result
    let cuStreamEndCapture: @convention(c) (OpaquePointer?, UnsafeMutablePointer<OpaquePointer?>) -> Result
    let cuGraphInstantiate: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, OpaquePointer?, UInt64) -> Result
    let cuGraphLaunch: @convention(c) (OpaquePointer?, OpaquePointer?) -> Result
    let cuGraphExecDestroy: @convention(c) (OpaquePointer?) -> Result
    let cuGraphDestroy: @convention(c) (OpaquePointer?) -> Result

    init(driver: CUDADriver) throws {
        do {
            cuStreamBeginCapture = try driver.library.function("cuStreamBeginCapture_v2", "cuStreamBeginCapture")
            cuStreamEndCapture = try driver.library.function("cuStreamEndCapture")
            cuGraphInstantiate = try driver.library.function("cuGraphInstantiateWithFlags")
            cuGraphLaunch = try driver.library.function("cuGraphLaunch")
            cuGraphExecDestroy = try driver.library.function("cuGraphExecDestroy")
            cuGraphDestroy = try driver.library.function("cuGraphDestroy")
        } catch let error as MissingSymbolError {
            throw CUDAError(call: "dlsym", "\(error); CUDA graphs need a driver for CUDA 11.4 or newer")
        }
    }
}

/// An instantiated graph recorded from a stream.
public final class CUDAGraph {
    let api: CUDAGraphAPI
    let driver: CUDADriver
    private let graph: OpaquePointer?
    private let exec: OpaquePointer?

    /// Records what `body` launches on `stream` (nothing runs while recording) and instantiates it.
    /// `body` must not allocate device memory or synchronise.
    public init(device: CUDADevice, stream: CUDAStream, _ body: () throws -> Void) throws {
        driver = device.driver
        api = try CUDAGraphAPI(driver: driver)
        // CU_STREAM_CAPTURE_MODE_RELAXED = 2: other threads' CUDA calls are not affected.
        try driver.check(api.cuStreamBeginCapture(stream.handle, 2), "cuStreamBeginCapture")
        var recorded: OpaquePointer? = nil
        do {
            try body()
        } catch {
            _ = api.cuStreamEndCapture(stream.handle, &recorded)
            if recorded != nil { _ = api.cuGraphDestroy(recorded) }
            throw error
        }
        try driver.check(api.cuStreamEndCapture(stream.handle, &recorded), "cuStreamEndCapture")
        var instance: OpaquePointer? = nil
        do {
            try driver.check(api.cuGraphInstantiate(&instance, recorded, 0), "cuGraphInstantiateWithFlags")
        } catch {
            _ = api.cuGraphDestroy(recorded)
            throw error
        }
        graph = recorded
        exec = instance
    }

    deinit {
        _ = api.cuGraphExecDestroy(exec)
        _ = api.cuGraphDestroy(graph)
    }

    /// Replays the graph on `stream`.
    public func launch(on stream: CUDAStream) throws {
        try driver.check(api.cuGraphLaunch(exec, stream.handle), "cuGraphLaunch")
    }
}
