// The seam between the model code and the devices that run it.
//
// The CPU backend (DecoderModel with the kernels in Backend/CPU) is the readable reference; the CUDA
// backend (Backend/CUDA) implements the same two roles on the GPU. Each op of the CUDA backend is also
// checked on its own against its CPU twin (Backend/CPU/Reference, run by qlora-gpu-check).

#if canImport(Glibc)
import Glibc
#endif

/// Generation: a model with a KV cache that turns tokens into next-token logits.
public protocol InferenceSession: AnyObject {
    var config: DecoderConfig { get }
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
    public let model: DecoderModel
    let cache: KVCache

    public init(model: DecoderModel, capacity: Int) {
        self.model = model
        cache = KVCache(config: model.config, capacity: capacity)
    }

    public var config: DecoderConfig { model.config }
    public var capacity: Int { cache.capacity }
    public var length: Int { cache.length }
    public func next(_ tokens: [Int]) throws -> [Float] { try model.forward(tokens: tokens, cache: cache, lastOnly: true) }
    public func reset() { cache.reset() }
}

/// Batched generation: answers for many prompts at once, the seam where a device that decodes many sequences together
/// (the GPU's batched generator) plugs in. Every caller that scores or lists answers (`qlora eval --generate`, the demo's
/// exact match, `generate --prompts-file`, evaluation during training) goes through `AnswerGeneration.generate`, which
/// calls this. The CPU reference (`SessionBatchGenerator`) decodes the requests one after the other.
///
/// The contract, which makes the answers independent of how requests are batched: request i's tokens are what
/// `Generator.generate(session:prompt:maxTokens:sampling:stopIDs:)` gives for its prompt and its own `sampling` (a
/// `Sampler` seeded with `sampling.seed`, fed the logits of that sequence alone); a sequence ends at its first stop id
/// (not included, `stoppedAtEOS` true) or after `maxTokens` tokens. Prompts may differ in length.
public protocol BatchGenerator: AnyObject {
    /// "cpu" or "cuda", for logs.
    var deviceName: String { get }
    /// The most requests one call takes; callers split longer lists (and report progress between calls).
    var maxBatchSize: Int { get }
    /// One answer per request, in the requests' order.
    func generate(_ requests: [GenerationRequest], maxTokens: Int, stopIDs: Set<Int>) throws -> [GeneratedSequence]
}

/// One prompt to answer.
public struct GenerationRequest: Sendable, Equatable {
    public var prompt: [Int]
    /// Greedy (temperature 0) or sampled with this request's own seed.
    public var sampling: SamplingOptions

    public init(prompt: [Int], sampling: SamplingOptions) {
        self.prompt = prompt
        self.sampling = sampling
    }
}

/// The tokens generated for one request.
public struct GeneratedSequence: Sendable, Equatable {
    public var tokens: [Int]
    /// True when a stop id ended it (false: it ran to `maxTokens`).
    public var stoppedAtEOS: Bool

    public init(tokens: [Int], stoppedAtEOS: Bool) {
        self.tokens = tokens
        self.stoppedAtEOS = stoppedAtEOS
    }
}

/// Training: the compute of one LoRA fine-tuning run, driven by `Trainer` (which owns the data order, schedule,
/// logging, evaluation and checkpoints). The CPU engine (`CPUTrainingEngine`) is the reference; the CUDA engine
/// (`CUDATrainingEngine`) keeps the LoRA weights, gradients and optimizer state on the GPU and copies the weights
/// back into the CPU model only when they are saved.
public protocol TrainingEngine: AnyObject {
    /// "cpu" or "cuda", for logs.
    var deviceName: String { get }
    /// The arithmetic of activations and products: "fp32" on the CPU, the GPU's "bf16" or "fp16" (report.html).
    var computeType: String { get }
    /// The optimizer's kind, as recorded in checkpoints.
    var optimizerKind: OptimizerKind { get }
    /// Adds one micro-batch's gradients of (loss sum / normalizer); `first` zeroes the gradients before.
    /// Returns the micro-batch's loss sum and counted tokens.
    func accumulate(batch: TrainingBatch, normalizer: Int, options: TrainingStepOptions, first: Bool) throws -> LossSum
    /// Clips the accumulated gradients to global norm `maxGradNorm` (0: no clipping), then one optimizer update at
    /// `learningRate`. Returns the global gradient norm before clipping; when it is not finite, nothing is updated.
    func step(learningRate: Double, maxGradNorm: Double) throws -> Double
    /// Loss sum and counted tokens of a batch (no gradients kept).
    func loss(batch: TrainingBatch) throws -> LossSum
    /// Copies the trained LoRA weights into the CPU model's adapters (before saving them or using the model).
    func copyWeightsToModel() throws
    /// Takes the CPU model's adapter weights as the trained weights (after a checkpoint was loaded into the model).
    func loadWeightsFromModel() throws
    /// The optimizer state, named as the CPU optimizers name it (checkpoints resume on either backend).
    func optimizerState() throws -> [TensorRecord]
    /// Restores what `optimizerState()` saved.
    func loadOptimizerState(_ file: SafeTensorsFile) throws
    /// The fp16 path's dynamic loss scale (nil when the engine computes in bf16 or fp32: nothing to scale).
    var lossScaler: GradScaler? { get }
    /// The latest `step` skipped its update because the scaled gradients overflowed (fp16 only; the loss scaler
    /// has halved the scale). Its returned norm is then inf or nan.
    var lastStepSkipped: Bool { get }
    /// Takes a saved loss scaler's state (a resumed fp16 run).
    func restoreLossScaler(scale: Float, growthTracker: Int, skippedSteps: Int)
    /// A generator for `model` (whose adapter holds the trained weights, after `copyWeightsToModel`) on this engine's
    /// device, for the task metrics during training. The GPU's shares the trainer's NF4 base instead of uploading a
    /// second copy of it.
    func batchGenerator(model: DecoderModel) throws -> BatchGenerator
    /// Data parallel: the next `accumulate` is the step's last micro-batch. An engine that overlaps communication with
    /// the backward starts summing each block's finished LoRA gradients over `collective` as the backward goes;
    /// `reduceGradients` completes the sum. (Default: nothing; `reduceGradients` does all.)
    func prepareGradientReduction(over collective: Collective) throws
    /// Data parallel: replaces the accumulated LoRA gradients by their sum over the ranks of `collective` (before `step`).
    func reduceGradients(over collective: Collective) throws
    /// Every rank, before rank 0 writes a checkpoint: an engine whose ranks each hold part of the optimizer state
    /// (sharded adapters) gathers it, so `optimizerState()` on rank 0 is the whole. (Default: nothing.)
    func gatherStateForSave() throws
    /// Every rank, where rank 0 may then copy the weights to the model alone (evaluation, checkpoints, the end): an
    /// engine whose ranks each hold part of the masters (ZeRO-2 on the GPU) gathers them into the model, so that
    /// `copyWeightsToModel` needs no other rank. (Default: nothing.)
    func gatherWeights() throws
    /// The most memory this engine's device has held so far (the GPU allocator's high-water mark; on the CPU the
    /// process's peak resident memory), for the job summary.
    var peakMemoryBytes: Int { get }
}

extension TrainingEngine {
    /// The process's peak resident memory (getrusage: ru_maxrss is in KiB on Linux).
    public var peakMemoryBytes: Int {
        var usage = rusage()
        guard getrusage(RUSAGE_SELF.rawValue, &usage) == 0 else { return 0 }
        return Int(usage.ru_maxrss) * 1024
    }
    public func prepareGradientReduction(over collective: Collective) throws {}
    public func gatherStateForSave() throws {}
    public func gatherWeights() throws {}
    public var lossScaler: GradScaler? { nil }
    public var lastStepSkipped: Bool { false }
    public func restoreLossScaler(scale: Float, growthTracker: Int, skippedSteps: Int) {}
}

/// Where `Trainer` (and a command) computes.
public enum ComputeDevice {
    case cpu
    case cuda(CUDAContext)

    public var isCUDA: Bool { if case .cuda = self { return true } else { return false } }
}
