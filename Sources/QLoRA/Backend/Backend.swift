// The seam between the model code and the devices that run it.
//
// The CPU backend (LlamaModel with the kernels in Backend/CPU) is the readable reference; the CUDA
// backend (Backend/CUDA) implements the same two roles on the GPU. Each op of the CUDA backend is also
// checked on its own against its CPU twin (Backend/CPU/Reference, run by qlora-gpu-check).

/// Generation: a model with a KV cache that turns tokens into next-token logits.
public protocol InferenceSession: AnyObject {
    var config: LlamaConfig { get }
    /// Positions the session can hold.
    var capacity: Int { get }
    /// Positions already fed.
    var length: Int { get }
    /// Feeds `tokens` after what the session holds and returns the logits of the last one, [vocab].
    func next(_ tokens: [Int]) throws -> [Float]
    /// Forgets everything fed so far.
    func reset()
}

/// The CPU session: the model's fp32 forward over a KV cache.
public final class CPUInferenceSession: InferenceSession {
    public let model: LlamaModel
    let cache: KVCache

    public init(model: LlamaModel, capacity: Int) {
        self.model = model
        cache = KVCache(config: model.config, capacity: capacity)
    }

    public var config: LlamaConfig { model.config }
    public var capacity: Int { cache.capacity }
    public var length: Int { cache.length }
    public func next(_ tokens: [Int]) throws -> [Float] { try model.forward(tokens: tokens, cache: cache, lastOnly: true) }
    public func reset() { cache.reset() }
}
