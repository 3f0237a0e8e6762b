import ArgumentParser
import QLoRA

/// The sampling options of every command that generates (greedy by default).
struct SamplingArguments: ParsableArguments {
    @Option(parsing: .unconditional, help: "Sampling temperature; 0 is greedy.")
    var temperature: Float = 0

    @Option(parsing: .unconditional, help: "Sample only from the k most likely tokens (0: all).")
    var topK: Int = 0

    @Option(parsing: .unconditional, help: "Sample only from the smallest set of tokens whose probability reaches p (1: all).")
    var topP: Float = 1

    @Option(parsing: .unconditional, help: "Random seed for sampling: an integer from 0 to 2^64-1 (prompt i of a list samples with seed + i).")
    var seed: UInt64 = 0

    var options: SamplingOptions { SamplingOptions(temperature: temperature, topK: topK, topP: topP, seed: seed) }
}
