// Where a training run reports its metrics: transformers' `report_to` (a string or a list), here with the two
// writers we have. `jsonl` is metrics.jsonl in the output folder (one JSON object per logging step and evaluation);
// `tensorboard` is event files in OUTPUT/runs/ (TensorBoard.swift). The default is jsonl alone: what runs wrote before
// report_to existed, and TensorBoard stays opt-in as in transformers, whose default has been "none" since v5.
// "all" is both; "none" is neither (report.html and the checkpoints' trainer_state.json still hold the history).

public struct ReportTargets: OptionSet, Sendable, Equatable, CustomStringConvertible {
    public let rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }

    public static let jsonl = ReportTargets(rawValue: 1)
    public static let tensorboard = ReportTargets(rawValue: 2)
    public static let all: ReportTargets = [.jsonl, .tensorboard]

    /// What `report_to` accepts.
    public static let accepted = "tensorboard, jsonl, all or none"

    /// Parses `report_to` values ("tensorboard", ["tensorboard", "jsonl"], "all", "none"; case and spaces ignored).
    /// The error names the value and what is accepted; the caller adds the file or flag.
    public static func parse(_ values: [String]) throws -> ReportTargets {
        let names = values.map { $0.trimmingCharacters(in: " \t").lowercased() }
        guard !names.isEmpty else { throw UsageError("no value") }
        var targets: ReportTargets = []
        for name in names {
            switch name {
            case "jsonl": targets.insert(.jsonl)
            case "tensorboard": targets.insert(.tensorboard)
            case "all": targets.formUnion(.all)
            case "none":
                guard names.count == 1 else { throw UsageError("'none' cannot be combined with other values (got \(values.joined(separator: ", ")))") }
            default:
                let hint = ["wandb", "mlflow", "comet_ml", "trackio", "swanlab", "clearml", "neptune", "dvclive", "azure_ml"].contains(name)
                    ? " (\(name) is a transformers integration we do not have)" : ""
                throw UsageError("unknown value '\(name)'\(hint)")
            }
        }
        return targets
    }

    /// Parses the `--report-to` flag: comma-separated values.
    public static func parse(flag: String) throws -> ReportTargets {
        do {
            return try parse(flag.split(separator: ",", omittingEmptySubsequences: false).map(String.init))
        } catch let error as UsageError {
            throw UsageError("--report-to \(flag): \(error.message); expected \(accepted), comma-separated")
        }
    }

    public var description: String {
        let names = (contains(.tensorboard) ? ["tensorboard"] : []) + (contains(.jsonl) ? ["jsonl"] : [])
        return names.isEmpty ? "none" : names.joined(separator: ",")
    }
}
