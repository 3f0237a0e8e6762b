// Dynamic loss scaling for fp16 training, as torch.amp.GradScaler does it.
//
// fp16 gradients underflow (below 2^-24 they are 0) long before fp32 ones do, so the loss is multiplied by a large
// scale S before the backward; every gradient is then S times too large, and is divided by S (in fp32) before
// clipping and the optimizer. When S is too large some fp16 value overflows to inf (or becomes nan), the step is
// skipped and S is halved; after `growthInterval` clean steps in a row S doubles. torch's update rule
// (`_amp_update_scale_`), with its defaults:
//     found inf:  S ← S · backoff (0.5),  tracker ← 0                               the optimizer step is skipped
//     else:       tracker ← tracker + 1;  if tracker = interval (2000): S ← S · growth (2) when that is finite, tracker ← 0
// starting from S = 2^16. The scale is an fp32 value, as torch keeps it.
//
// "found inf" here is the gradient norm after unscaling being inf or nan: one inf or nan gradient makes it so. (The
// norm of finite gradients could overflow fp32 only with gradients beyond 1e19, which no run survives anyway.)
//
// When the scale collapses, the run stops: a skip that leaves S below 1 means gradients overflow even unscaled,
// which no scale can fix (a diverged run, or activations beyond fp16's range). From 2^16 that is 17 skips in a row.

/// torch.amp.GradScaler's scale schedule (no tensors: the trainer reports found-inf per step).
public struct GradScaler: Sendable, Equatable {
    public private(set) var scale: Float
    /// Clean steps since the last growth or backoff.
    public private(set) var growthTracker: Int
    public let growthFactor: Float
    public let backoffFactor: Float
    public let growthInterval: Int
    /// Steps skipped so far (not part of torch's state: for the logs).
    public private(set) var skippedSteps = 0
    /// Skips in a row up to now.
    public private(set) var consecutiveSkips = 0

    /// The scale below which a skip stops the run (see the header).
    public static let collapseThreshold: Float = 1

    public init(initialScale: Float = 65536, growthFactor: Float = 2, backoffFactor: Float = 0.5, growthInterval: Int = 2000) {
        precondition(initialScale > 0 && growthFactor > 1 && backoffFactor > 0 && backoffFactor < 1 && growthInterval > 0)
        scale = initialScale
        growthTracker = 0
        self.growthFactor = growthFactor
        self.backoffFactor = backoffFactor
        self.growthInterval = growthInterval
    }

    /// After a step's gradients were unscaled: `foundInf` when any was inf or nan. Returns whether the optimizer
    /// step is taken (false: skipped).
    @discardableResult
    public mutating func update(foundInf: Bool) -> Bool {
        if foundInf {
            scale *= backoffFactor
            growthTracker = 0
            skippedSteps += 1
            consecutiveSkips += 1
            return false
        }
        consecutiveSkips = 0
        growthTracker += 1
        if growthTracker == growthInterval {
            let grown = scale * growthFactor
            if grown.isFinite { scale = grown }
            growthTracker = 0
        }
        return true
    }

    /// The scale fell below `collapseThreshold`: gradients overflow even unscaled.
    public var hasCollapsed: Bool { scale < Self.collapseThreshold }

    /// Restores a saved state (a resumed run).
    public mutating func restore(scale: Float, growthTracker: Int, skippedSteps: Int) {
        self.scale = scale
        self.growthTracker = growthTracker
        self.skippedSteps = skippedSteps
        consecutiveSkips = 0
    }
}
