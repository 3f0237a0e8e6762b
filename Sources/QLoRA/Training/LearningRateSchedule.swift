// Learning-rate schedules exactly as transformers' get_scheduler builds them (a LambdaLR whose factor
// multiplies the base rate), in Double as Python computes them. With w warmup steps and T training steps,
// the rate after s scheduler steps (the rate of the optimizer's (s+1)-th update) is base · λ(s):
//     constant:              λ = 1                                   (warmup ignored, as in transformers)
//     constant_with_warmup:  λ = s / max(1, w) for s < w, else 1
//     linear:                λ = s / max(1, w) for s < w, else max(0, (T − s) / max(1, T − w))
//     cosine:                λ = s / max(1, w) for s < w, else with p = (s − w) / max(1, T − w)
//                            max(0, ½(1 + cos(π · cycles · 2 · p))), cycles = 0.5
// Warmup from a ratio: w = ceil(ratio · T) (TrainingArguments.get_warmup_steps); explicit steps win.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The shape of a schedule, by transformers' `lr_scheduler_type` names.
public enum ScheduleKind: String, CaseIterable, Sendable {
    case constant
    case constantWithWarmup = "constant_with_warmup"
    case linear
    case cosine

    /// Parses a name; throws a usage error listing the choices.
    public static func parse(_ name: String) throws -> ScheduleKind {
        guard let kind = ScheduleKind(rawValue: name.lowercased()) else {
            throw UsageError("unknown learning-rate schedule '\(name)' (expected one of \(allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        return kind
    }
}

/// A learning-rate schedule over a fixed number of optimizer steps.
public struct LearningRateSchedule: Equatable, Sendable {
    public var kind: ScheduleKind
    public var baseLearningRate: Double
    public var warmupSteps: Int
    public var trainingSteps: Int
    /// Cosine only: half a cycle by default (decay to 0 at the end).
    public var cycles: Double

    public init(kind: ScheduleKind, baseLearningRate: Double, warmupSteps: Int, trainingSteps: Int, cycles: Double = 0.5) {
        self.kind = kind
        self.baseLearningRate = baseLearningRate
        self.warmupSteps = max(0, warmupSteps)
        self.trainingSteps = trainingSteps
        self.cycles = cycles
    }

    /// Warmup given as steps (used when > 0) or as a ratio of the training steps (rounded up).
    public init(kind: ScheduleKind, baseLearningRate: Double, trainingSteps: Int, warmupSteps: Int = 0, warmupRatio: Double = 0) throws {
        guard warmupRatio >= 0, warmupRatio <= 1 else { throw UsageError("warmup ratio must lie in [0, 1]; got \(warmupRatio)") }
        guard warmupSteps >= 0 else { throw UsageError("warmup steps must be >= 0; got \(warmupSteps)") }
        guard trainingSteps >= 0 else { throw UsageError("training steps must be >= 0; got \(trainingSteps)") }
        self.init(kind: kind, baseLearningRate: baseLearningRate,
                  warmupSteps: LearningRateSchedule.resolveWarmup(steps: warmupSteps, ratio: warmupRatio, trainingSteps: trainingSteps),
                  trainingSteps: trainingSteps)
    }

    /// transformers: `warmup_steps if warmup_steps > 0 else math.ceil(num_training_steps * warmup_ratio)`.
    public static func resolveWarmup(steps: Int, ratio: Double, trainingSteps: Int) -> Int {
        steps > 0 ? steps : Int((Double(trainingSteps) * ratio).rounded(.up))
    }

    /// The multiplier λ(s) after `step` scheduler steps.
    public func factor(atStep step: Int) -> Double {
        let s = step, w = warmupSteps, total = trainingSteps
        switch kind {
        case .constant:
            return 1
        case .constantWithWarmup:
            return s < w ? Double(s) / max(1.0, Double(w)) : 1
        case .linear:
            if s < w { return Double(s) / Double(max(1, w)) }
            return max(0.0, Double(total - s) / Double(max(1, total - w)))
        case .cosine:
            if s < w { return Double(s) / Double(max(1, w)) }
            let progress = Double(s - w) / Double(max(1, total - w))
            return max(0.0, 0.5 * (1.0 + cos(Double.pi * cycles * 2.0 * progress)))
        }
    }

    /// The learning rate after `step` scheduler steps: the rate of the optimizer's update number `step + 1`.
    public func learningRate(atStep step: Int) -> Double { baseLearningRate * factor(atStep: step) }
}
