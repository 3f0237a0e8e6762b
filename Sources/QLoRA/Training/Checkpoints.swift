// Training checkpoints: `checkpoint-N/` with the adapter (PEFT format), the optimizer state and
// the trainer state. A checkpoint is written beside its place (`checkpoint-N.tmp-<pid>/`) and renamed
// into place, so a crash never leaves a half-written checkpoint that resume would pick up.

#if canImport(Glibc)
import Glibc
#endif

/// The trainer's own state: what resume needs beyond the adapter and the optimizer.
struct TrainerState {
    var step = 0
    /// The best value of the best-model metric (metric_for_best_model) so far.
    var bestMetric: Double?
    var bestStep: Int?
    var evaluationsWithoutImprovement = 0
    var history: [StepRecord] = []
    var evalHistory: [(step: Int, loss: Double)] = []
    /// The task metrics of each evaluation (eval_<metric> keys), when there were any.
    var metricHistory: [(step: Int, values: [(String, Double)])] = []
    /// The fp16 path's loss scaler (scale, growth tracker, skipped steps so far), as torch saves GradScaler's state.
    var lossScaler: (scale: Float, growthTracker: Int, skippedSteps: Int)?

    func json() -> JSONValue {
        var fields: [(String, JSONValue)] = []
        if let s = lossScaler {
            fields = [("loss_scale", .double(Double(s.scale))), ("loss_scale_growth_tracker", .int(Int64(s.growthTracker))),
                      ("skipped_steps", .int(Int64(s.skippedSteps)))]
        }
        return .object(JSONObject(fields + [
            ("global_step", .int(Int64(step))),
            ("best_metric", bestMetric.map { .double($0) } ?? .null),
            ("best_step", bestStep.map { .int(Int64($0)) } ?? .null),
            ("evaluations_without_improvement", .int(Int64(evaluationsWithoutImprovement))),
            ("log_history", .array(history.map { r in .object(JSONObject([
                ("step", .int(Int64(r.step))), ("loss", .double(r.loss)), ("learning_rate", .double(r.learningRate)),
                ("grad_norm", .double(r.gradientNorm)), ("tokens", .int(Int64(r.tokens)))])) })),
            ("eval_history", .array(evalHistory.map { .object(JSONObject([("step", .int(Int64($0.step))), ("eval_loss", .double($0.loss))])) })),
            ("eval_metric_history", .array(metricHistory.map { entry in
                .object(JSONObject([("step", .int(Int64(entry.step)))] + entry.values.map { ($0.0, .double($0.1)) })) })),
        ]))
    }

    init() {}

    init(json: JSONValue, file: String) throws {
        guard let step = json["global_step"]?.int, step >= 0 else {
            throw FileFormatError(file: file, place: "'global_step'", "expected a non-negative integer, got \(json["global_step"]?.serialized() ?? "nothing")")
        }
        self.step = step
        bestMetric = json["best_metric"]?.double
        bestStep = json["best_step"]?.int
        evaluationsWithoutImprovement = json["evaluations_without_improvement"]?.int ?? 0
        if let scale = json["loss_scale"]?.double {
            guard scale > 0, scale.isFinite, let tracker = json["loss_scale_growth_tracker"]?.int, tracker >= 0 else {
                throw FileFormatError(file: file, place: "'loss_scale'", "expected a positive scale and a non-negative 'loss_scale_growth_tracker'")
            }
            lossScaler = (Float(scale), tracker, max(0, json["skipped_steps"]?.int ?? 0))
        }
        history = (json["log_history"]?.array ?? []).compactMap { r in
            guard let s = r["step"]?.int, let l = r["loss"]?.double else { return nil }
            return StepRecord(step: s, loss: l, learningRate: r["learning_rate"]?.double ?? 0, gradientNorm: r["grad_norm"]?.double ?? 0,
                              tokens: r["tokens"]?.int ?? 0)
        }
        evalHistory = (json["eval_history"]?.array ?? []).compactMap { e in
            guard let s = e["step"]?.int, let l = e["eval_loss"]?.double else { return nil }
            return (s, l)
        }
        metricHistory = (json["eval_metric_history"]?.array ?? []).compactMap { e in
            guard let s = e["step"]?.int, let object = e.object else { return nil }
            return (s, object.compactMap { key, value in key == "step" ? nil : value.double.map { (key, $0) } })
        }
    }
}

enum Checkpoints {
    static let prefix = "checkpoint-"

    /// Steps of the complete checkpoints in `directory`, ascending.
    static func steps(in directory: String) throws -> [Int] {
        guard FileSystem.isDirectory(directory) else { return [] }
        return try FileSystem.listDirectory(directory).compactMap { name in
            guard name.hasPrefix(prefix), let step = Int(name.dropFirst(prefix.count)),
                  FileSystem.exists(directory + "/" + name + "/trainer_state.json") else { return nil }
            return step
        }.sorted()
    }

    static func latest(in directory: String) throws -> String? {
        try steps(in: directory).last.map { directory + "/" + prefix + String($0) }
    }

    static func save(step: Int, state: TrainerState, model: DecoderModel, loraConfig: LoRAConfig, engine: TrainingEngine,
                     in directory: String, keep: Int, protectStep: Int?, card: String? = nil) throws {
        let final = directory + "/" + prefix + String(step)
        try FileSystem.writeDirectory(final) { partial in
            try PEFTAdapter.writeFiles(model: model, config: loraConfig, into: partial)
            if let card { try FileSystem.writeAtomically(partial + "/README.md", text: card) }
            try SafeTensorsWriter.write(engine.optimizerState(), metadata: ["optimizer": engine.optimizerKind.rawValue],
                                        to: partial + "/optimizer.safetensors")
            try FileSystem.writeAtomically(partial + "/trainer_state.json", text: state.json().serialized(.init(indent: 2)) + "\n")
        }
        // Rotate: keep the newest `keep` checkpoints, and always the best one.
        if keep > 0 {
            let all = try steps(in: directory)
            for old in all.dropLast(keep) where old != protectStep { removeTree(directory + "/" + prefix + String(old)) }
        }
    }

    static func restore(_ checkpoint: String, model: DecoderModel, engine: TrainingEngine) throws -> TrainerState {
        let statePath = checkpoint + "/trainer_state.json"
        let json: JSONValue
        do { json = try JSONValue.parse(bytes: try FileSystem.readFile(statePath)) } catch let e as JSONParseError {
            throw FileFormatError(file: statePath, place: "JSON", e.description)
        }
        let state = try TrainerState(json: json, file: statePath)
        try loadAdapterWeights(from: checkpoint, into: model)
        try engine.loadWeightsFromModel()
        try engine.loadOptimizerState(try SafeTensorsFile(path: checkpoint + "/optimizer.safetensors"))
        if let s = state.lossScaler { engine.restoreLossScaler(scale: s.scale, growthTracker: s.growthTracker, skippedSteps: s.skippedSteps) }
        return state
    }

    /// Copies saved LoRA weights into the adapters already attached to `model` (same shapes required).
    static func loadAdapterWeights(from directory: String, into model: DecoderModel) throws {
        let path = directory + "/adapter_model.safetensors"
        let file = try SafeTensorsFile(path: path)
        for layer in model.linearLayers {
            guard let lora = layer.lora else { continue }
            for (suffix, matrix) in [("lora_A.weight", lora.a), ("lora_B.weight", lora.b)] {
                let name = PEFTAdapter.keyPrefix + layer.name + "." + suffix
                guard let info = file.info(name) else { throw FileFormatError(file: path, place: "tensor '\(name)'", "missing") }
                guard info.shape == [matrix.rows, matrix.columns] else {
                    throw FileFormatError(file: path, place: "tensor '\(name)'", "shape \(info.shape), expected \([matrix.rows, matrix.columns]) (was the run configured differently?)")
                }
                _ = matrix.storage.update(fromContentsOf: try file.floats(name))
            }
        }
    }

    static func removeTree(_ path: String) { FileSystem.removeTree(path) }
}
